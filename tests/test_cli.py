"""The command line: happy paths, and one-line errors with exit 2 and nothing written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import file_tree
from nodulab.cli import app
from nodulab.synth.scenarios import list_presets

SMALL = ["--n", "8", "--size", "32", "--pixel-mm", "1.4"]
PRESET = "size-confound"

BAD_SCENARIO = """\
name = "bad"
description = "an unknown factor"
[image]
dim = 2
size = 32
pixel_mm = 1.4
[label]
factor = "shape"
malignant = "spiculated"
benign = ["round"]
[factors]
not_a_factor = 3
[splits]
train = { n = 8 }
val = { n = 8 }
"""


BAD_CASES = (
    "unknown preset",
    "bad toml",
    "scenario error",
    "size 0",
    "n 0",
    "dim 4",
    "no out",
    "validate missing",
    "gallery missing",
    "export missing",
    "unknown format",
    "export onto existing",
    "unknown option",
)


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def generate(runner: CliRunner, out: Path, *extra: str):
    return runner.invoke(app, ["generate", PRESET, "--out", str(out), *SMALL, *extra])


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "ds"
    result = generate(CliRunner(), out)
    assert result.exit_code == 0, result.output
    return out


def test_help_and_scenarios(runner: CliRunner) -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("scenarios", "generate", "validate", "gallery", "export"):
        assert command in result.output
    result = runner.invoke(app, ["scenarios"])
    assert result.exit_code == 0
    for name, _ in list_presets():
        assert name in result.output
    assert runner.invoke(app, []).exit_code == 0  # no arguments: help


def test_generate_writes_dataset_and_summary(dataset: Path) -> None:
    assert (dataset / "dataset.json").is_file()
    assert np.load(dataset / "train" / "images.npy", mmap_mode="r").shape == (8, 32, 32)
    assert [p.name for p in dataset.parent.iterdir()] == ["ds"]


def test_generate_is_byte_identical_for_the_same_seed(runner: CliRunner, dataset: Path, tmp_path: Path) -> None:
    assert generate(runner, tmp_path / "again").exit_code == 0
    assert file_tree(tmp_path / "again") == file_tree(dataset)


def test_generate_3d(runner: CliRunner, tmp_path: Path) -> None:
    args = [
        "generate",
        PRESET,
        "--out",
        str(tmp_path / "v"),
        "--n",
        "2",
        "--dim",
        "3",
        "--size",
        "16",
        "--pixel-mm",
        "2.8",
    ]
    assert runner.invoke(app, args).exit_code == 0
    assert np.load(tmp_path / "v" / "val" / "masks.npy").shape == (2, 16, 16, 16)


def test_existing_out_is_refused_and_untouched(runner: CliRunner, dataset: Path) -> None:
    before = file_tree(dataset)
    result = generate(runner, dataset, "--seed", "3")
    assert result.exit_code == 2
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1 and "--out" in result.stderr
    assert file_tree(dataset) == before


def test_force_replaces(runner: CliRunner, tmp_path: Path) -> None:
    out = tmp_path / "ds"
    out.mkdir()
    assert generate(runner, out, "--force").exit_code == 0
    assert (out / "dataset.json").is_file() and [p.name for p in tmp_path.iterdir()] == ["ds"]


def _bad_inputs(tmp: Path, dataset: Path) -> dict[str, tuple[list[str], str]]:
    (tmp / "broken.toml").write_text("name = [unclosed\n")
    (tmp / "invalid.toml").write_text(BAD_SCENARIO)
    out = str(tmp / "out")
    return {
        "unknown preset": (["generate", "no-such-preset", "--out", out], "no-such-preset"),
        "bad toml": (["generate", str(tmp / "broken.toml"), "--out", out], "broken.toml"),
        "scenario error": (["generate", str(tmp / "invalid.toml"), "--out", out], "not_a_factor"),
        "size 0": (["generate", PRESET, "--out", out, "--size", "0"], "--size"),
        "n 0": (["generate", PRESET, "--out", out, "--n", "0"], "--n"),
        "dim 4": (["generate", PRESET, "--out", out, "--dim", "4"], "--dim"),
        "no out": (["generate", PRESET], "--out"),
        "validate missing": (["validate", str(tmp / "missing")], "missing"),
        "gallery missing": (["gallery", str(tmp / "missing"), "--out", str(tmp / "out.png")], "missing"),
        "export missing": (["export", str(tmp / "missing"), "--format", "png", "--out", out], "missing"),
        "unknown format": (["export", str(dataset), "--format", "jpeg", "--out", out], "--format"),
        "export onto existing": (["export", str(dataset), "--format", "png", "--out", str(tmp)], "--out"),
        "unknown option": (["generate", PRESET, "--out", out, "--colour", "red"], "--colour"),
    }


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_is_one_line_exit_2_nothing_written(
    case: str, runner: CliRunner, dataset: Path, tmp_path: Path
) -> None:
    args, names = _bad_inputs(tmp_path, dataset)[case]
    before = sorted(p.name for p in tmp_path.iterdir())
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert names in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output, no temp folder


def test_validate_passes_then_fails_after_a_flipped_byte(runner: CliRunner, tmp_path: Path) -> None:
    out = tmp_path / "ds"
    assert generate(runner, out).exit_code == 0
    result = runner.invoke(app, ["validate", str(out)])
    assert result.exit_code == 0, result.output
    assert "✓" in result.output and "✗" not in result.output
    path = out / "val" / "images.npy"
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0x01
    path.write_bytes(bytes(raw))
    result = runner.invoke(app, ["validate", str(out)])
    assert result.exit_code == 1
    assert "✗ val: sha256 val/images.npy" in result.output


def test_gallery_writes_png(runner: CliRunner, dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "gallery.png"
    result = runner.invoke(app, ["gallery", str(dataset), "--out", str(out), "--per-cell", "2"])
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("fmt, name", [("medmnist", "d.npz"), ("nifti", "nii"), ("png", "png")])
def test_export_formats(fmt: str, name: str, runner: CliRunner, dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / name
    result = runner.invoke(app, ["export", str(dataset), "--format", fmt, "--out", str(out)])
    assert result.exit_code == 0, result.output
    if fmt == "medmnist":
        with np.load(out) as npz:
            assert npz["train_images"].shape == (8, 32, 32) and npz["train_labels"].shape == (8, 1)
    else:
        suffix = ".nii.gz" if fmt == "nifti" else ".png"
        assert len(list((out / "train").glob(f"*{suffix}"))) == 8
        assert (out / "labels.csv").is_file()
    assert [p.name for p in tmp_path.iterdir()] == [name]


def test_every_input_error_takes_the_one_error_path() -> None:
    """Every ValueError subclass nodulab defines is an InputError (one line, exit 2), whichever
    modules a command imported; the CLI needs no list of them."""
    import importlib
    import inspect
    import pkgutil

    import nodulab
    from nodulab.common.errors import InputError

    found = {}
    for info in pkgutil.walk_packages(nodulab.__path__, "nodulab."):
        if info.name.endswith(("ray_executor", "__main__")):
            continue
        module = importlib.import_module(info.name)
        for name, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == info.name and issubclass(cls, ValueError):
                found[f"{info.name}.{name}"] = cls
    assert {"nodulab.common.writing.DatasetError", "nodulab.results.store.StoreError"} <= set(found)
    assert [n for n, cls in found.items() if not issubclass(cls, InputError)] == []
