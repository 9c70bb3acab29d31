"""headops.cli: the command table, and matplotlib loaded only to write a plot."""

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=os.path.join(ROOT, "python")))


def test_importing_the_library_and_the_cli_does_not_import_matplotlib():
    proc = _python("import sys, headops, headops.cli\n"
                   "headops.cli.build_parser()\n"
                   "print(sorted(m for m in sys.modules if m.split('.')[0] == 'matplotlib'))")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_a_command_without_a_plot_does_not_import_matplotlib(tmp_path):
    out = tmp_path / "sh"
    proc = _python("import sys, headops.cli\n"
                   f"status = headops.cli.main(['shapley', '--model', 'tiny', '--tokens', '8', '--permutations', '1',"
                   f" '--no-plot', '--quiet', '--out', {str(out)!r}])\n"
                   "assert status == 0\n"
                   "print('matplotlib' in sys.modules)")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().endswith("False") and (tmp_path / "sh.csv").is_file()
    assert not (tmp_path / "sh.png").exists()


def test_every_command_in_the_table_has_help_options_and_run():
    import headops.cli

    for name in headops.cli.COMMANDS:
        command = headops.cli._command(name)
        assert command.HELP and callable(command.add_arguments) and callable(command.run), name


TINY_DISCOVER = ["--model", "tiny", "--quiet", "--lengths", "400", "--depths", "0", "1", "--needles", "1", "--period",
                 "8", "--rows", "2", "--tokens", "64", "--length", "360", "--prompts", "1", "--passkeys", "2",
                 "--words", "2", "--steps", "2", "--sinks", "2", "--window", "8"]


@pytest.mark.parametrize("method", ["retrieval", "retrieval-reasoning", "echo", "induction", "sink", "duo",
                                    "duo-ablation"])
def test_discover_writes_per_head_scores_deterministically_on_the_tiny_model(method, tmp_path, capsys):
    import csv

    import headops
    import headops.cli
    from headops.testing import tiny_llama

    outs = [tmp_path / f"{method}_{run}" for run in (0, 1)]
    for out in outs:
        assert headops.cli.main(["discover", "--method", method, *TINY_DISCOVER, "--no-plot", "--out", str(out)]) == 0
    rows = list(csv.DictReader(open(f"{outs[0]}.csv")))
    assert [(int(r["layer"]), int(r["head"]), int(r["kv_head"])) for r in rows] == \
        [(layer, h, h // 2) for layer in range(2) for h in range(4)]  # tiny_llama: 2 layers, 4 query / 2 KV heads
    assert all(float(r["score"]) >= 0 for r in rows)
    assert open(f"{outs[0]}.csv").read() == open(f"{outs[1]}.csv").read()  # the same seed, the same scores
    assert "top 1 of 4 KV heads" in capsys.readouterr().out
    if method == "duo":
        spec = headops.HeadSpec.from_duo_attention(tiny_llama()[0], f"{outs[0]}_full_attention_heads.tsv", sinks=2,
                                                   window=8)
        assert spec.num_layers == 2


def test_discover_takes_the_needle_task(tmp_path, capsys):
    import headops.cli

    out = tmp_path / "r2"
    assert headops.cli.main(["discover", "--method", "retrieval-reasoning", *TINY_DISCOVER, "--task", "passkey",
                             "--min-f1", "0", "--no-plot", "--out", str(out)]) == 0
    assert "retrieval-reasoning:" in capsys.readouterr().out and (tmp_path / "r2.csv").exists()
    with pytest.raises(SystemExit):
        headops.cli.main(["discover", "--method", "retrieval", *TINY_DISCOVER, "--task", "haystack", "--out", str(out)])


def test_discover_loads_the_model_in_the_dtype_asked_for(tmp_path):
    import headops.cli
    from headops.cli.discover import read_scores

    for dtype in ("float32", "bfloat16"):
        for method in ("sink", "retrieval-reasoning", "duo"):
            assert headops.cli.main(["discover", "--method", method, *TINY_DISCOVER, "--dtype", dtype, "--no-plot",
                                     "--out", str(tmp_path / f"{method}_{dtype}")]) == 0
    for method in ("sink", "duo"):
        single, half = (read_scores(str(tmp_path / f"{method}_{dtype}.csv")) for dtype in ("float32", "bfloat16"))
        assert bool(torch.isfinite(half).all()) and not torch.equal(single, half)  # bf16 arithmetic, close to fp32's
        torch.testing.assert_close(half, single, atol=0.05, rtol=0.05)
    with pytest.raises(SystemExit):
        headops.cli.main(["discover", "--method", "sink", *TINY_DISCOVER, "--dtype", "float8", "--out", str(tmp_path)])


def test_compare_writes_the_agreement_of_score_tables(tmp_path, capsys):
    import csv

    import headops.cli
    from headops.cli.discover import write_scores
    from headops.head_scores import overlaps, rank_correlation

    g = torch.Generator().manual_seed(0)
    tables = {name: torch.rand(3, 6, generator=g, dtype=torch.float64) for name in ("x", "y", "z")}
    for name, values in tables.items():
        write_scores(str(tmp_path / f"{name}.csv"), values, 2)
    out = tmp_path / "cmp"
    assert headops.cli.main(["compare", f"first={tmp_path / 'x.csv'}", str(tmp_path / "y.csv"),
                             str(tmp_path / "z.csv"), "--top-fraction", "0.5", "--out", str(out)]) == 0
    assert "Jaccard of the top 3 KV heads" in capsys.readouterr().out and (tmp_path / "cmp.md").exists()
    rows = list(csv.DictReader(open(f"{out}.csv")))
    assert [(r["a"], r["b"]) for r in rows] == [("first", "y"), ("first", "z"), ("y", "z")]
    pairs, _ = overlaps({"first": tables["x"], "y": tables["y"], "z": tables["z"]}, 2, 0.5)
    for r in rows:
        a, b = tables["x" if r["a"] == "first" else r["a"]], tables[r["b"]]
        assert float(r["jaccard_kv_heads"]) == pytest.approx(pairs["KV heads"][(r["a"], r["b"])], abs=1e-6)
        assert float(r["spearman"]) == pytest.approx(rank_correlation(a, b), abs=1e-6)
    from headops.cli.discover import read_kv_heads

    assert read_kv_heads(str(tmp_path / "x.csv")) == 2
    write_scores(str(tmp_path / "per_layer.csv"), tables["x"], (2, 3, 6))  # layers of other KV head counts
    assert read_kv_heads(str(tmp_path / "per_layer.csv")) == (2, 3, 6)
    write_scores(str(tmp_path / "other.csv"), torch.rand(3, 6, generator=g, dtype=torch.float64), 3)
    for argv, match in ((["x.csv"], "at least two"), (["x.csv", "nothing.csv"], "no such file"),
                        (["x.csv", "other.csv"], "different models' heads"), (["x.csv", "x.csv"], "given twice")):
        with pytest.raises(SystemExit, match=match):
            headops.cli.main(["compare", *[str(tmp_path / a) for a in argv], "--out", str(out)])


def test_discover_draws_its_heat_map_and_names_a_bad_option(tmp_path):
    import headops.cli

    out = tmp_path / "sink"
    assert headops.cli.main(["discover", "--method", "sink", *TINY_DISCOVER, "--out", str(out)]) == 0
    assert (tmp_path / "sink.png").stat().st_size > 0
    with pytest.raises(SystemExit, match="--top-fraction must be in"):
        headops.cli.main(["discover", "--method", "sink", *TINY_DISCOVER, "--top-fraction", "0", "--out", str(out)])


def test_info_names_the_cpu_variant_the_build_and_the_devices():
    import torch

    import headops
    from headops import _C
    from headops.cli import info

    proc = _python("import headops.cli; raise SystemExit(headops.cli.main(['info', '--head-dim', '64']))")
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert f"headops {headops.__version__}" in text and f"kernel variant: {_C.cpu_capability()}" in text
    assert "bfloat16 tiles (D = 64)" in text
    for dtype, name in ((torch.bfloat16, "bfloat16"), (torch.float16, "float16")):
        # the layout the self-test found: brgemm reads VNNI pairs, or (float16 without AMX-FP16) plain rows
        pairs = _C.cpu_brgemm_pairs(dtype)
        assert pairs in (0, 1, 2) and (pairs > 0) == _C.cpu_uses_packed_operands(dtype, 64)
        if dtype == torch.float16 and _C.cpu_splits_half_into_bf16_tiles(64):
            assert "float16 tiles (D = 64): each operand as two bfloat16 parts on headops' own AMX" in text
        elif dtype == torch.float16 and _C.cpu_widens_half_to_float_tiles(64):
            assert pairs == 0 and "float16 tiles (D = 64): widened to float32 and run through float32 brgemm" in text
        elif pairs and not _C.cpu_runs_own_amx_tiles(dtype, 64):
            assert f"{name} tiles (D = 64): brgemm in the input dtype, B in " \
                   f"{'VNNI pairs' if pairs == 2 else 'plain rows'}" in text
    assert _C.cpu_brgemm_pairs(torch.bfloat16) in (0, 2)  # bfloat16's brgemm always reads pairs
    block_q, block_k = _C.cpu_tile_shape(torch.float32, 64)
    assert f"float32 {block_q}x{block_k} / " in text and "L2 per core" in text
    assert ("CUDA kernels: compiled for" in text) == bool(_C.cuda_compiled)
    assert info.describe(64) == text.rstrip("\n").split("\n")


def test_a_build_for_another_torch_is_refused_at_import(tmp_path, monkeypatch):
    import types

    from headops import _build

    fake = types.ModuleType("headops._build_info")
    fake.BUILD = {"torch_version": "1.0.0+other", "torch_cuda": None, "cpu_variants": ["DEFAULT"], "cuda_archs": None,
                  "why_not_cuda": "HEADOPS_CUDA=0"}
    monkeypatch.setitem(sys.modules, "headops._build_info", fake)
    assert _build.build_info()["torch_version"] == "1.0.0+other"
    with pytest.raises(ImportError, match=r"compiled against torch 1\.0\.0\+other, but this is torch 2\.9"):
        _build.check_torch("2.9")
    _build.check_torch("1.0.0+other")  # the same torch: no error
    monkeypatch.setitem(sys.modules, "headops._build_info", None)  # no record (an older build tree): no check
    assert _build.build_info() is None
    _build.check_torch("2.9")


def save_with_a_char_tokenizer(model, folder):
    """save_pretrained of `model` beside a character-level fast tokenizer (ids 0-2 special, 3-96
    the characters ' ' to '}', as headops.testing.CharTokenizer's) that AutoTokenizer loads."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{chr(c): c - 29 for c in range(32, 126)}}
    fast = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE(vocab, merges=[], unk_token="<unk>")),
                                   unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>")
    model.save_pretrained(folder)
    fast.save_pretrained(folder)


def test_the_commands_take_a_model_folder(tmp_path, capsys):
    """--model <folder of save_pretrained's files>: a causal LM (GPT-NeoX) through discover, prune and
    shapley, an encoder (DistilBERT) through prune's sentence-embedding study; file names and plot
    titles take the folder's name; a folder without a model, an encoder for retrieval and an
    encoder-decoder are refused by name."""
    import csv

    import transformers

    import headops.cli
    from headops.testing import tiny_gpt_neox

    causal = tmp_path / "pythia-tiny"
    save_with_a_char_tokenizer(tiny_gpt_neox()[0], causal)
    out = tmp_path / "sink"
    assert headops.cli.main(["discover", "--method", "sink", "--model", str(causal), "--rows", "2", "--tokens", "40",
                             "--quiet", "--no-plot", "--out", str(out)]) == 0
    with open(f"{out}.csv") as f:
        assert len(list(csv.DictReader(f))) == 2 * 4  # every (layer, head)
    assert headops.cli.main(["prune", "--model", str(causal), "--tokens", "24", "--steps", "2", "--repeats", "1",
                             "--quiet", "--no-plot", "--out", str(tmp_path / "prune")]) == 0
    assert headops.cli.main(["shapley", "--model", str(causal), "--tokens", "8", "--permutations", "1", "--quiet",
                             "--no-plot", "--out", str(tmp_path / "shapley")]) == 0
    assert "pythia-tiny" in capsys.readouterr().out
    cfg = transformers.DistilBertConfig(vocab_size=97, dim=64, n_layers=2, n_heads=4, hidden_dim=128,
                                        max_position_embeddings=64)
    encoder = tmp_path / "distilbert-tiny"
    save_with_a_char_tokenizer(transformers.DistilBertModel(cfg).eval(), encoder)
    assert headops.cli.main(["prune", "--model", str(encoder), "--tokens", "16", "--passages", "4", "--steps", "2",
                             "--repeats", "1", "--quiet", "--no-plot", "--out", str(tmp_path / "prune_enc")]) == 0
    assert "cos_sim" in open(tmp_path / "prune_enc.csv").readline()
    with pytest.raises(SystemExit, match="retrieval needs a model that generates"):
        headops.cli.main(["discover", "--method", "retrieval", "--model", str(encoder), "--quiet", "--no-plot",
                          "--out", str(tmp_path / "r")])
    with pytest.raises(SystemExit, match="neither a bundled model .* nor a folder holding a transformers model"):
        headops.cli.main(["prune", "--model", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")])
    from headops.testing import tiny_bart

    seq2seq = tmp_path / "bart"
    save_with_a_char_tokenizer(tiny_bart()[0], seq2seq)
    with pytest.raises(SystemExit, match="an encoder-decoder model"):
        headops.cli.main(["prune", "--model", str(seq2seq), "--out", str(tmp_path / "x")])
