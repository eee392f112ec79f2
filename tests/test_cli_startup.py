"""Start-up: ``nodulab --help`` loads no deep-learning stack; the CLI's choices match the library's."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import as_from_a_terminal
from nodulab import cli
from nodulab.common import choices
from nodulab.data import export
from nodulab.training import hparams, losses, models
from nodulab.training import loop as train

SRC = str(Path(__file__).resolve().parents[1] / "src")
HEAVY = ("torch", "pytorch_metric_learning", "sklearn", "matplotlib", "pandas", "monai", "pydicom")


def _python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": SRC}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)


def test_cli_import_and_help_load_no_heavy_module() -> None:
    code = (
        "import sys, contextlib, io\n"
        "from nodulab.cli import app\n"
        "with contextlib.redirect_stdout(io.StringIO()): app(['--help'], prog_name='nodulab', standalone_mode=False)\n"
        "app(['scenarios'], prog_name='nodulab', standalone_mode=False)\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    assert _python(code).stdout.strip().splitlines()[-1] == "[]"


def test_package_import_is_light() -> None:
    assert (
        _python(f"import sys, nodulab; print(sorted(m for m in {HEAVY!r} if m in sys.modules))").stdout.strip() == "[]"
    )


def test_light_choices_match_the_library() -> None:
    # losses come from the torch-free registry: the CLI's help names every loss and parameter
    assert all(f"{name}: " in cli.loss_help() for name in hparams.names())
    assert all(f"{key} (" in cli.loss_param_help() for name in losses.names() for key in losses.params(name))
    assert models.ENCODERS == choices.ENCODERS and export.EXPORT_FORMATS == choices.EXPORT_FORMATS
    assert (train.VIEWS, train.DEVICES, train.SELECTIONS) == (choices.VIEWS, choices.DEVICES, choices.SELECTIONS)


@pytest.mark.parametrize("delay_s", [0.15, 0.6])
def test_ctrl_c_during_start_up_exits_130_without_traceback(tmp_path: Path, delay_s: float) -> None:
    env = {**os.environ, "PYTHONPATH": SRC}
    args = [
        sys.executable,
        "-m",
        "nodulab",
        "generate",
        "clean",
        "--n",
        "8",
        "--size",
        "32",
        "--pixel-mm",
        "1.4",
        "--out",
        str(tmp_path / "ds"),
    ]
    proc = subprocess.Popen(
        args, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env, preexec_fn=as_from_a_terminal
    )
    time.sleep(delay_s)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    if proc.returncode == 0:
        pytest.skip("generate finished before the signal arrived")
    assert proc.returncode == 130, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and err.startswith("error: ")
    assert not tmp_path.joinpath("ds").exists() and not list(tmp_path.iterdir())
