"""headops.cli: the command table, and matplotlib loaded only to write a plot."""

import os
import subprocess
import sys

import pytest

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
