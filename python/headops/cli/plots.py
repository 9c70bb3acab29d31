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
