"""``python -m headops <command>``: head-level studies of a real model, from the command line.

    python -m headops prune --model smollm2 --tokens 256 --steps 10 --out results/prune_smollm2
    python -m headops prune --model minilm --tokens 128 --passages 16 --out results/prune_minilm
    python -m headops shapley --model smollm2 --tokens 64 --permutations 4 --out results/shapley_smollm2
    python -m headops discover --method retrieval --model smollm2 --lengths 512 1024 --out results/retrieval
    python -m headops compare retrieval=results/retrieval.csv duo=results/duo.csv
    python -m headops evaluate --model smollm2 --tasks passkey niah_single --lengths 2048 4096 --samples 50 \
        --scores retrieval=results/retrieval.csv --methods standard --out results/evaluate_smollm2
    python -m headops info

Each command is a module of this package with HELP (one line), add_arguments(parser) and
run(args) -> exit status; COMMANDS maps its name to it. Adding a command is a new module and
one entry in COMMANDS. Plots come from cli/plots.py, the only module that imports matplotlib,
and only when a plot is written.

Under torchrun (``torchrun --nproc-per-node N -m headops shapley ...``) every process runs the
command and the sweeps split their work items over the processes (headops._distributed): rank 0
prints and writes <out>; the other ranks print nothing and write into a temporary folder that is
removed (so that no command needs to know which rank it runs on).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import tempfile

from .. import _distributed

# command name -> its module, relative to this package; imported when main() builds the parser,
# not by `import headops.cli`
COMMANDS = {
    "prune": ".prune",
    "shapley": ".shapley",
    "discover": ".discover",
    "compare": ".compare",
    "evaluate": ".evaluate",
    "info": ".info",
}


def _command(name: str):
    return importlib.import_module(COMMANDS[name], __name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m headops", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        command = _command(name)
        command.add_arguments(sub.add_parser(name, help=command.HELP, description=command.__doc__.split("\n\n")[0]))
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    command = _command(args.command)
    if not _distributed.init_from_torchrun():  # (joined once per process, left at its exit)
        return command.run(args)
    import torch.distributed as dist

    if dist.get_rank() == 0:
        if dist.get_world_size() > 1:
            print(f"{dist.get_world_size()} processes: the sweeps split their work over them")
        return command.run(args)
    return _run_unseen(command, args)


def _run_unseen(command, args) -> int:
    """A rank other than 0: the same work, no output (stdout to /dev/null, files to a temporary folder)."""
    with tempfile.TemporaryDirectory(prefix="headops-rank-") as folder, open(os.devnull, "w") as nowhere, \
            contextlib.redirect_stdout(nowhere):
        args.out, args.quiet, args.no_plot = os.path.join(folder, "out"), True, True
        return command.run(args)
