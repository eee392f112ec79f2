"""Issue 7: no command loses data, writes outside its output, or crashes on bad data.

Every case is one line ``error: ...`` on stderr, exit 2, and nothing written or lost (``validate``
reports bad data as failed checks, exit 1). Datasets are tiny copies of one generated fixture.
"""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import assert_one_line_error, file_tree
from nodulab.cli import app
from nodulab.common import writing
from nodulab.data import dataset as data

SMALL = ["--n", "8", "--size", "32", "--pixel-mm", "1.4"]
SRC = str(Path(__file__).resolve().parents[1] / "src")
FAST = ["--loss", "ce", "--epochs", "1", "--batch-size", "8", "--device", "cpu"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def original(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("safety") / "base"
    result = CliRunner().invoke(app, ["generate", "size-confound", "--out", str(out), *SMALL])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture
def base(original: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private copy of the dataset as ``tmp_path/base``; the cwd is ``tmp_path``."""
    monkeypatch.chdir(tmp_path)
    return Path(shutil.copytree(original, tmp_path / "base"))


def invoke(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def no_scratch(folder: Path) -> None:
    assert not [p.name for p in folder.iterdir() if p.name.startswith((".tmp-", ".old-"))]


# ----------------------------------------------------------------------------- data loss
@pytest.mark.parametrize(
    "command",
    [
        ["train", "base", *FAST, "--out", "base", "--force"],
        ["train", "base", *FAST, "--out", "base/run", "--force"],
        ["export", "base", "--format", "medmnist", "--out", "base", "--force"],
        ["export", "base", "--format", "png", "--out", "base/train", "--force"],
        ["export", "base", "--format", "nifti", "--out", ".", "--force"],
        ["gallery", "base", "--out", "base/train/g.png"],
        ["generate", "clean", *SMALL, "--out", ".", "--force"],
        ["generate", "clean", *SMALL, "--out", "..", "--force"],
        ["generate", "clean", *SMALL, "--out", "base/..", "--force"],
    ],
    ids=[
        "train-onto-data",
        "train-inside-data",
        "export-onto-data",
        "export-inside-data",
        "export-cwd",
        "gallery-inside-data",
        "generate-cwd",
        "generate-parent",
        "generate-dotdot-cwd",
    ],
)
def test_out_never_replaces_or_enters_an_input(base: Path, command: list[str]) -> None:
    before = file_tree(base.parent)
    assert_one_line_error(invoke(*command))
    assert file_tree(base.parent) == before
    no_scratch(base.parent)


def test_train_refuses_out_that_contains_the_dataset(base: Path, tmp_path: Path) -> None:
    par = tmp_path / "par"
    par.mkdir()
    shutil.move(base, par / "ds")
    before = file_tree(par)
    assert_one_line_error(invoke("train", "par/ds", *FAST, "--out", "par", "--force"), "would replace the input")
    assert file_tree(par) == before


def test_generate_refuses_out_holding_its_scenario_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "my.toml").write_text((Path(SRC) / "nodulab/presets/clean.toml").read_text())
    (proj / "notes.txt").write_text("keep me")
    before = file_tree(proj)
    assert_one_line_error(invoke("generate", "proj/my.toml", *SMALL, "--out", "proj", "--force"), "my.toml")
    assert file_tree(proj) == before
    assert invoke("generate", "proj/my.toml", *SMALL, "--out", "proj/data").exit_code == 0  # beside it is fine


def test_a_symlink_cannot_smuggle_out_into_an_input(base: Path, tmp_path: Path) -> None:
    (tmp_path / "link").symlink_to(base / "train")
    before = file_tree(base)
    assert_one_line_error(invoke("export", "base", "--format", "png", "--out", "link/x"), "inside the input")
    assert file_tree(base) == before


# ----------------------------------------------------------------------------- hostile manifests
def _edit_manifest(root: Path, edit) -> None:
    manifest = json.loads((root / "dataset.json").read_text())
    edit(manifest)
    (root / "dataset.json").write_text(json.dumps(manifest))


def _rename_split(manifest: dict, new: str) -> None:
    manifest["splits"] = {(new if k == "val" else k): v for k, v in manifest["splits"].items()}


HOSTILE = {
    "split-dotdot": lambda m: _rename_split(m, "../../../y"),
    "split-absolute": lambda m: _rename_split(m, "/tmp/evil"),
    "file-steered": lambda m: m["splits"]["val"]["images"].update(file="../../x/images.npy"),
    "no-splits": lambda m: m.pop("splits"),
    "no-images-entry": lambda m: m["splits"]["val"].pop("images"),
    "bad-shape": lambda m: m["splits"]["val"]["images"].update(shape=[8, 64, 64]),
    "n-huge": lambda m: m["splits"]["val"].update(n=10**12),
    "no-image": lambda m: m.pop("image"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_manifest_is_refused_everywhere(base: Path, tmp_path: Path, case: str) -> None:
    _edit_manifest(base, HOSTILE[case])
    before = file_tree(tmp_path)
    for command in (
        ["export", "base", "--format", "png", "--out", "exp/x"],
        ["gallery", "base", "--out", "g.png"],
        ["train", "base", *FAST, "--out", "run"],
    ):
        assert_one_line_error(invoke(*command))
        assert file_tree(tmp_path) == before, command
    result = invoke("validate", "base")
    assert result.exit_code == 1 and "✗ manifest" in result.output, result.output


# ----------------------------------------------------------------------------- bad data
def _truncate(root: Path) -> None:
    path = root / "val/masks.npy"
    os.truncate(path, path.stat().st_size - 100)


def _object_array(root: Path) -> None:
    np.save(root / "val/images.npy", np.array([None] * 8, dtype=object), allow_pickle=True)


def _csv_cell(root: Path, old: str, new: str, line: int = 1) -> None:
    path = root / "val/factors.csv"
    lines = path.read_text().splitlines()
    header = lines[0].split(",")
    cells = lines[line].split(",")
    cells[header.index(old)] = new
    lines[line] = ",".join(cells)
    path.write_text("\n".join(lines) + "\n")


BAD_DATA = {
    "truncated-npy": _truncate,
    "object-array": _object_array,
    "cell-abc": lambda root: _csv_cell(root, "diameter_mm", "abc"),
    "label-7": lambda root: _csv_cell(root, "label", "7"),
    "deleted-row": lambda root: (root / "val/factors.csv").write_text(
        "".join((root / "val/factors.csv").read_text().splitlines(keepends=True)[:-1])
    ),
    "missing-column": lambda root: (root / "val/factors.csv").write_text(
        "\n".join(",".join(line.split(",")[1:]) for line in (root / "val/factors.csv").read_text().splitlines()) + "\n"
    ),
    "unknown-shape": lambda root: _csv_cell(root, "shape", "square"),
    "empty-csv": lambda root: (root / "val/factors.csv").write_text(""),
    "npy-is-folder": lambda root: ((root / "val/masks.npy").unlink(), (root / "val/masks.npy").mkdir()),
    "dtype-swap": lambda root: np.save(root / "val/masks.npy", np.zeros((8, 32, 32), dtype=np.int16)),
}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data_gives_one_line_and_validate_reports_it(base: Path, tmp_path: Path, case: str) -> None:
    BAD_DATA[case](base)
    before = file_tree(tmp_path)
    for command in (
        ["export", "base", "--format", "medmnist", "--out", "x.npz"],
        ["gallery", "base", "--out", "g.png"],
        ["train", "base", *FAST, "--out", "run"],
    ):
        assert_one_line_error(invoke(*command), "val")
        assert file_tree(tmp_path) == before, command
    result = invoke("validate", "base", "--n-rerender", "2")
    assert result.exit_code == 1 and "✗ val:" in result.output, result.output
    assert "Traceback" not in result.output


def test_load_split_never_unpickles(base: Path) -> None:
    _object_array(base)
    with pytest.raises(data.DatasetError, match="val/images.npy"):
        data.load_split(base, "val")


# ----------------------------------------------------------------------------- bad flags and scenarios
def _scenario(tmp_path: Path, extra: str = "", n: int = 8) -> Path:
    text = (Path(SRC) / "nodulab/presets/clean.toml").read_text()
    path = tmp_path / "s.toml"
    lines = [line for line in text.splitlines() if not line.startswith(("train", "val", "test"))]
    path.write_text("\n".join(lines) + f"\ntrain = {{ n = {n} }}\nval = {{ n = 8 }}\n" + extra)
    return path


def test_huge_n_is_refused_before_anything_is_allocated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert_one_line_error(invoke("generate", "clean", "--n", str(10**12), "--out", "x"), "--n")
    assert_one_line_error(invoke("generate", str(_scenario(tmp_path, n=10**12)), "--out", "x"), "splits.train.n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.toml"]
    assert "1,000,000" in invoke("generate", "--help").output.replace("\n", " ")


def test_overflowing_choice_weights_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    path = _scenario(tmp_path)
    path.write_text(
        path.read_text().replace(
            "[factors]", "[factors]\nsolid_fraction = { choice = [0.3, 0.5], weights = [1e308, 1e308] }"
        )
    )
    assert_one_line_error(invoke("generate", str(path), *SMALL, "--out", "x"), "weights")


def test_scenario_file_over_1_mib_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    path = _scenario(tmp_path)
    path.write_text(path.read_text() + "#" * (1 << 20) + "\n")
    assert_one_line_error(invoke("generate", str(path), *SMALL, "--out", "x"), "KiB")


def test_disk_space_is_checked_before_writing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(data.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**6, 10**6 - 1000, 1000))
    assert_one_line_error(invoke("generate", "clean", *SMALL, "--out", "x"), "MiB")
    assert list(tmp_path.iterdir()) == []


def test_full_disk_is_one_line_and_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    calls = []

    def full(self: data._ArrayFile, block: np.ndarray) -> None:
        calls.append(1)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(data._ArrayFile, "append", full)
    assert_one_line_error(invoke("generate", "clean", *SMALL, "--out", "sub/x"), "no space left")
    assert calls and list(tmp_path.iterdir()) == []


def test_arrays_are_written_without_a_memory_map(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A writable memory map turns ENOSPC into SIGBUS: generate must not open one."""
    monkeypatch.chdir(tmp_path)

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("open_memmap used for writing")

    monkeypatch.setattr(np.lib.format, "open_memmap", refuse)
    assert invoke("generate", "clean", *SMALL, "--out", "x").exit_code == 0


# ----------------------------------------------------------------------------- gallery
def test_gallery_writes_only_png_never_overwrites_and_names_what_it_wrote(base: Path, tmp_path: Path) -> None:
    assert_one_line_error(invoke("gallery", "base", "--out", "g.xyz"), ".png")
    assert_one_line_error(invoke("gallery", "base", "--out", "gal"), ".png")
    assert not (tmp_path / "g.xyz").exists() and not (tmp_path / "gal.png").exists()
    (tmp_path / "g.png").write_bytes(b"precious")
    assert_one_line_error(invoke("gallery", "base", "--out", "g.png"), "already exists")
    assert (tmp_path / "g.png").read_bytes() == b"precious"
    result = invoke("gallery", "base", "--out", "g.png", "--force")
    assert result.exit_code == 0 and "wrote g.png" in result.output
    assert (tmp_path / "g.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".g.png")]


# ----------------------------------------------------------------------------- races and leftovers
def test_rename_into_place_is_exclusive(tmp_path: Path) -> None:
    """Another process finishing the same --out first wins; this one fails, the winner is intact."""
    from nodulab.synth.scenarios import load_scenario

    scenario = load_scenario("clean", n=8, size=32, pixel_mm=1.4)
    out = tmp_path / "ds"

    def other_process_wins(stage: str, done: int, total: int) -> None:
        if not out.exists():
            out.mkdir()
            (out / "winner").write_text("first")
            (out / "dataset.json").write_text("{}")  # another nodulab generate: --force may replace it

    with pytest.raises(data.OutExists, match="appeared"):
        data.generate(scenario, out, progress=other_process_wins)
    assert file_tree(out) == {"winner": b"first", "dataset.json": b"{}"}
    no_scratch(tmp_path)
    data.generate(scenario, out, force=True, progress=other_process_wins)
    assert data.is_complete(out, dataset=True) and not (out / "winner").exists()
    no_scratch(tmp_path)


def test_stale_temp_folders_of_dead_processes_are_removed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = writing._HOST
    stale = tmp_path / f".tmp-x-{host}-{dead.pid}-abc12345"
    live = tmp_path / f".tmp-x-{host}-{os.getppid()}-abc12345"
    other_out = tmp_path / f".tmp-xy-{host}-{dead.pid}-abc12345"
    other_host = tmp_path / f".tmp-x-elsewhere-{dead.pid}-abc12345"
    for folder in (stale, live, other_out, other_host):
        folder.mkdir()
        (folder / "images.npy").write_bytes(b"partial")
    assert invoke("generate", "clean", *SMALL, "--out", "x").exit_code == 0
    assert not stale.exists() and live.exists() and other_out.exists() and other_host.exists()


def test_an_input_named_like_a_dead_process_scratch_folder_is_never_removed(tmp_path: Path) -> None:
    """The tidy-up of dead processes' temporary siblings skips the command's inputs, whatever their name."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    source = tmp_path / f".tmp-x-{writing._HOST}-{dead.pid}-abc12345"
    source.mkdir()
    (source / "scenario.toml").write_text("kept")
    with writing.staged(tmp_path / "x", inputs=[source / "scenario.toml"]) as tmp:
        (tmp / "file").write_text("new")
    assert (source / "scenario.toml").read_text() == "kept" and (tmp_path / "x" / "file").is_file()


def test_sigterm_during_generate_exits_143_and_removes_the_temp_folder(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": SRC}
    args = [
        sys.executable,
        "-m",
        "nodulab",
        "generate",
        "clean",
        "--n",
        "3000",
        "--size",
        "32",
        "--pixel-mm",
        "1.4",
        "--out",
        str(tmp_path / "ds"),
    ]
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    deadline = time.monotonic() + 60
    while not any(p.name.startswith(".tmp-ds-") for p in tmp_path.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- umask
@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_outputs_follow_the_umask(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, umask: int) -> None:
    monkeypatch.chdir(tmp_path)
    old = os.umask(umask)
    try:
        assert invoke("generate", "clean", *SMALL, "--out", "ds").exit_code == 0
        assert invoke("export", "ds", "--format", "medmnist", "--out", "ds.npz").exit_code == 0
        assert invoke("gallery", "ds", "--out", "g.png").exit_code == 0
        # weights (safetensors replaces its file with a new inode) and checkpoints follow it too
        trained = invoke("train", "ds", "--loss", "ce", "--epochs", "2", "--batch-size", "4", "--out", "run")
        assert trained.exit_code == 0, trained.output
    finally:
        os.umask(old)
    run = tmp_path / "run"
    weights = [run / "model.safetensors", run / "readouts.safetensors", *(run / "checkpoints").iterdir()]
    assert len(weights) == 4  # model, readouts, checkpoints 1 and 2
    for path in [tmp_path / "ds", *(tmp_path / "ds").rglob("*"), tmp_path / "ds.npz", tmp_path / "g.png", *weights]:
        expected = (0o777 if path.is_dir() else 0o666) & ~umask
        assert path.stat().st_mode & 0o777 == expected, (path, oct(path.stat().st_mode))


def test_force_replaces_only_what_this_kind_of_command_wrote(tmp_path: Path) -> None:
    """--force never deletes a folder nodulab did not write, nor turns a folder into a file."""
    from nodulab.common.writing import staged
    from nodulab.synth.scenarios import load_scenario

    scenario = load_scenario("clean", n=4, size=32, pixel_mm=1.4)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    with pytest.raises(data.DatasetError, match="did not write .it holds no dataset.json"):
        data.generate(scenario, mine, force=True)
    assert file_tree(mine) == {"thesis.tex": b"years of work"}
    run_like = tmp_path / "run"
    run_like.mkdir()
    (run_like / "config.json").write_text("{}")
    with pytest.raises(data.DatasetError, match="holds no dataset.json"):  # a run is not a dataset
        data.generate(scenario, run_like, force=True)
    with pytest.raises(data.DatasetError, match="is a folder; not replacing it with a file"):
        with staged(mine, force=True, is_file=True):
            pass
    (tmp_path / "empty").mkdir()
    assert data.is_complete(data.generate(scenario, tmp_path / "empty", force=True), dataset=True)
    # inputs are checked where the folder is replaced, whoever calls it
    for out in (tmp_path / "empty", tmp_path / "empty" / "inner", tmp_path):
        with pytest.raises(data.DatasetError, match="input"):
            with staged(out, force=True, inputs=[tmp_path / "empty"], owner="dataset.json"):
                pass
    assert data.is_complete(tmp_path / "empty", dataset=True)
    no_scratch(tmp_path)


# ----------------------------------------------------------------------------- names in figures
HOSTILE_NAME = "a$\\x$ {b} <script>c</script> \\"


def test_user_strings_in_figures_are_plain_text(tmp_path: Path) -> None:
    """A name with $...$ would be mathtext (``$\\x$`` raises); every figure builder draws it as typed."""
    import pandas as pd
    from matplotlib.figure import Figure

    from nodulab.data.gallery import gallery_png
    from nodulab.results import figures
    from nodulab.synth.scenarios import load_scenario as load
    from nodulab.synth.scenarios import load_scenario_dict, scenario_to_dict

    bare = Figure()
    bare.subplots().set_title(HOSTILE_NAME)
    with pytest.raises(ValueError):  # the control: matplotlib's default reads it as maths
        bare.savefig(io.BytesIO(), format="png")
    d = scenario_to_dict(load("clean", n=4, size=32, pixel_mm=1.4))
    d["name"] = HOSTILE_NAME
    data.generate(load_scenario_dict(d), tmp_path / "ds")
    assert gallery_png(tmp_path / "ds").startswith(b"\x89PNG")
    matrix = pd.DataFrame([[0.5]], index=[HOSTILE_NAME], columns=[HOSTILE_NAME])
    assert figures.heatmap(matrix, title=HOSTILE_NAME, colorbar=HOSTILE_NAME).startswith(b"\x89PNG")
    frame = pd.DataFrame(
        {"label": HOSTILE_NAME, "seed": 0, "epoch": [1, 2], "measure": "balanced_accuracy", "value": [0.5, 0.6]}
    )
    assert figures.dynamics_figure(frame, title=HOSTILE_NAME).startswith(b"\x89PNG")
    curves = pd.DataFrame({"label": HOSTILE_NAME, "value": [6.0, 8.0], "mean_p": [0.2, 0.4]})
    assert figures.sweep_figure(curves, title=HOSTILE_NAME).startswith(b"\x89PNG")


def test_a_long_out_name_and_a_symlink_loop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 240-byte --out name fits (temporary siblings shorten it, hashed); a symlink loop is one line."""
    from nodulab.common.writing import short_name, write_atomically

    monkeypatch.chdir(tmp_path)
    long = "d" * 240
    result = invoke("generate", "clean", *SMALL, "--out", long)
    assert result.exit_code == 0, result.output
    assert (tmp_path / long / "dataset.json").is_file()
    write_atomically(tmp_path / ("f" * 250), lambda tmp: Path(tmp).write_text("x"))
    assert (tmp_path / ("f" * 250)).read_text() == "x"
    assert short_name("a" * 64) == "a" * 64 and len(short_name("é" * 200).encode()) <= 64
    assert short_name("b" * 300) != short_name("b" * 299)  # hashed: two long names stay apart
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    before = sorted(p.name for p in tmp_path.iterdir())
    for command in (["generate", "clean", *SMALL], ["gallery", long]):
        result = invoke(*command, "--out", "loop/x.png" if command[0] == "gallery" else "loop/x")
        assert result.exit_code == 2 and "cannot be resolved" in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_temporary_files_name_their_owner_and_a_later_write_removes_dead_ones(tmp_path: Path) -> None:
    """A kill -9 during a write leaves ``.<name>.<host>-<pid>.*``; the next write of that file removes
    it when that process is gone, and keeps a live process's."""
    from nodulab.common.writing import _HOST, write_atomically

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale = tmp_path / f".history.csv.{_HOST}-{dead_pid}.abc123"
    live = tmp_path / f".history.csv.{_HOST}-{os.getppid()}.def456"
    other = tmp_path / f".metrics.csv.{_HOST}-{dead_pid}.abc123"  # another file's: not this write's to remove
    for path in (stale, live, other):
        path.write_text("half")
    seen = []
    write_atomically(tmp_path / "history.csv", lambda tmp: (seen.append(Path(tmp).name), Path(tmp).write_text("x")))
    assert seen[0].startswith(f".history.csv.{_HOST}-{os.getpid()}.")  # its own temp names its owner
    assert not stale.exists() and live.exists() and other.exists()
    assert (tmp_path / "history.csv").read_text() == "x"


def test_a_full_disk_is_one_line_that_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "ds" / "images.npy"))

    monkeypatch.setattr(data, "generate", full)
    result = invoke("generate", "clean", *SMALL, "--out", str(tmp_path / "ds"))
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
    assert "no space left on the device" in result.output and "images.npy" in result.output
    assert "Errno" not in result.output
