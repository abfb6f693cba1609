import json
import subprocess
import sys

import pytest

from conftest import REPO, run_cli

pytestmark = pytest.mark.unit

HEAVY = ("torch", "mmdet", "mmengine", "mmcv", "pandas", "submitit", "matplotlib")


def test_help_imports_nothing_heavy():
    code = (
        "import sys; sys.argv=['ssflctl','--help']\n"
        "from ssflctl import cli\n"
        "try:\n    cli.main()\nexcept SystemExit:\n    pass\n"
        f"import json; print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert loaded == [], f"ssflctl --help imported {loaded}"
    assert "submit" in out.stdout and "report" in out.stdout


def test_version():
    from ssflctl import __version__

    proc = run_cli("--version")
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"ssflctl {__version__}"


def _commands():
    from ssflctl.cli import app
    import typer.main

    group = typer.main.get_command(app)
    out = []
    for name, cmd in group.commands.items():
        if hasattr(cmd, "commands"):
            out += [[name, sub] for sub in cmd.commands]
        else:
            out.append([name])
    return out


@pytest.mark.parametrize("cmd", _commands(), ids=lambda c: " ".join(c))
def test_every_command_help_has_an_example(cmd):
    proc = run_cli(*cmd, "--help")
    assert proc.returncode == 0, proc.stderr
    assert "Example: ssflctl " + " ".join(cmd) in " ".join(proc.stdout.split()), proc.stdout
