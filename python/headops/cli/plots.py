"""The commands' figures. The only module of headops that imports matplotlib; the commands
import it only when they write a plot, so the library and --no-plot runs never load it."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402


def plot_curves(rows, path, model_name, study):
    """prune: the metric (left) and each mask's forward time (right) against the fraction pruned."""
    m = study.metric_name
    x = [100 * r["fraction_pruned"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(x, [r[m + "_importance"] for r in rows], "o-", label="by importance (least first)")
    a.plot(x, [r[m + "_random"] for r in rows], "s--", label="random order")
    if study.log_scale:
        a.set_yscale("log")
    a.set_xlabel("heads pruned (%)")
    a.set_ylabel(study.metric_label)
    a.legend()
    a.set_title(f"{model_name}: {study.metric_label}", fontsize=10)
    b.plot(x, [r["forward_ms_importance"] for r in rows], "o-", label="by importance")
    b.plot(x, [r["forward_ms_random"] for r in rows], "s--", label="random order")
    b.set_xlabel("heads pruned (%)")
    b.set_ylabel("forward time (ms)")
    b.set_ylim(bottom=0)
    b.legend()
    b.set_title("forward time (gated heads are not computed)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_heads(phi, scores, path, model_name, permutations):
    """shapley: heat-maps of the Shapley values and of the gradient importance, layer x head."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 5))
    for ax, values, title in ((a, phi, f"Shapley value ({permutations} permutations)"),
                              (b, scores, "gradient importance |dL/dgate| (per layer)")):
        image = ax.imshow(values.numpy(), aspect="auto", cmap="viridis")
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_title(f"{model_name}: {title}", fontsize=10)
        fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_head_scores(values, path, model_name, label):
    """discover: one method's per-(layer, query head) scores as a layer x head heat map."""
    layers, heads = values.shape
    fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * heads + 2.5), max(3.5, 0.22 * layers + 1.5)))
    image = ax.imshow(values.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xlabel("query head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(heads))
    ax.set_title(f"{model_name}: {label}", fontsize=10)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_accuracy_vs_bytes(summary, path, model_name):
    """evaluate: accuracy (95 % Wilson interval) against the bytes each method's cache held, one
    panel per (task, length); dense and StreamingLLM drawn as reference lines."""
    panels = sorted({(s["task"], s["length"]) for s in summary})
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 4.2 * rows), squeeze=False)
    from ..evaluate import parse_method

    def series(s):  # a question-aware method is its own series beside its query-agnostic family
        return s["family"] + (" (q-aware)" if parse_method(s["method"]).question_aware else "")

    families = sorted({series(s) for s in summary} - {"dense"})
    markers = dict(zip(families, "osD^v<>pXh*12348"))
    for ax, (task, length) in zip(axes.flat, panels):
        mine = [s for s in summary if (s["task"], s["length"]) == (task, length)]
        for s in mine:
            if s["family"] == "dense":
                ax.axhline(100 * s["accuracy"], color="black", lw=1, label="dense")
                ax.axvline(s["bytes"] / 2**20, color="black", lw=0.5, ls=":")
        streaming = sorted((s for s in mine if s["family"] == "streaming_llm"), key=lambda s: s["bytes"])
        if streaming:
            ax.plot([s["bytes"] / 2**20 for s in streaming], [100 * s["accuracy"] for s in streaming], color="grey",
                    ls="--", lw=1)
        for family in families:
            points = sorted((s for s in mine if series(s) == family), key=lambda s: s["bytes"])
            if not points:
                continue
            x = [s["bytes"] / 2**20 for s in points]
            y = [100 * s["accuracy"] for s in points]
            err = [[100 * (s["accuracy"] - s["low"]) for s in points], [100 * (s["high"] - s["accuracy"]) for s in points]]
            ax.errorbar(x, y, yerr=err, fmt=markers[family], ms=5, capsize=2, label=family, alpha=0.85)
        n = max(s["samples"] for s in mine)
        ax.set_title(f"{model_name}: {task}, {length} tokens ({n} prompts)", fontsize=9)
        ax.set_xlabel("KV cache held per prompt (MiB)")
        ax.set_ylabel("exact match (%)")
        ax.set_ylim(-3, 103)
        ax.set_xlim(left=0)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    ncol = min(len(labels), 3 * cols)  # (3 entries fit under a panel's width)
    legend_rows = -(-len(labels) // max(ncol, 1))
    fig.legend(handles, labels, loc="lower center", ncol=max(ncol, 1), fontsize=8)
    fig.tight_layout(rect=(0, 0.045 * legend_rows / rows + 0.02, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
