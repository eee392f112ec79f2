"""Command line: ``nodulab scenarios | generate | import-lidc | validate | gallery | export | realism | train |
evaluate | explain | studies | study | report``.

Every kind of bad input (unknown preset, bad TOML, invalid scenario, out-of-range flag, existing
``--out``, missing dataset, unknown loss, foreign run folder) ends the same way: one line
``error: <message>`` on stderr, exit code 2, and nothing written. ``validate`` exits 1 when a
check fails.
"""

from __future__ import annotations

import errno
import signal
import sys
from collections.abc import Sequence
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from typer.core import TyperCommand, TyperGroup

try:  # typer >= 0.20 vendors click
    from typer._click.exceptions import ClickException
except ImportError:  # pragma: no cover - older typer depends on click
    from click.exceptions import ClickException

from nodulab.common.choices import (
    DEFAULT_EPOCHS,
    DEFAULT_LR,
    DEFAULT_WEIGHT_DECAY,
    DEVICES,
    ENCODERS,
    EXPORT_FORMATS,
    MAX_BATCH_SIZE,
    MAX_EPOCHS,
    MAX_JOBS,
    MAX_N,
    MAX_PER_CELL,
    MAX_SEED,
    MAX_THREADS,
    SELECTIONS,
    VIEWS,
)
from nodulab.common.errors import InputError
from nodulab.training import hparams

if TYPE_CHECKING:  # torch, sklearn, matplotlib and pandas load inside the commands that need them
    from rich.progress import Progress

EXIT_INPUT = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143
console = Console(highlight=False)


class Terminated(BaseException):
    """Raised by the SIGTERM handler: unwinds like Ctrl-C, so temporary folders are removed."""


class Stopped(Exception):
    """A command stopped by SIGINT or SIGTERM that says what it kept: one line, exit 130 or 143."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def _stopped(error: BaseException, kept: str) -> Stopped:
    """``Stopped`` for an interrupt (``KeyboardInterrupt`` or ``Terminated``), saying what was ``kept``."""
    if isinstance(error, Terminated):
        return Stopped(f"terminated (SIGTERM); {kept}", EXIT_TERMINATED)
    return Stopped(f"interrupted; {kept}", EXIT_INTERRUPTED)


def _terminate(signum: int, frame: Any) -> None:
    raise Terminated()


def _is_input_error(error: BaseException) -> bool:
    """Whether ``error`` is bad input (``common.errors.InputError``) or an OS error (a full disk, a
    permission): one line, exit 2."""
    return isinstance(error, (OSError, InputError))


def _message(error: BaseException) -> str:
    """An input error's one line; an OS error named by what failed and where (a full disk says so)."""
    if not isinstance(error, OSError) or error.strerror is None:
        return str(error)
    where = f" ({error.filename})" if error.filename else ""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left on the device{where}: free some space and run the command again (finished work is kept)"
    return f"{error.strerror.lower()}{where}"


def _fail(message: str) -> int:
    """Print ``error: message`` as exactly one line on stderr; return the input-error code."""
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
    return EXIT_INPUT


class OneLineErrors(TyperGroup):
    """A group whose usage and input errors print one line instead of a usage panel."""

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        argv = list(sys.argv[1:] if args is None else args)
        previous = _handle_sigterm()
        said = False
        try:
            code = super().main(argv or ["--help"], prog_name, complete_var, standalone_mode=False, **extra)
        except ClickException as e:
            code = _fail(e.format_message())
        except Terminated:
            _fail("terminated (SIGTERM); nothing was left half-written")
            code = EXIT_TERMINATED
        except Stopped as e:
            _fail(str(e))
            code, said = e.code, True
        except (ValueError, OSError) as e:
            if not _is_input_error(e):
                raise
            code = _fail(_message(e))
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
        if code == EXIT_INTERRUPTED and not said:  # typer turns KeyboardInterrupt into exit 130, silently
            _fail("interrupted; nothing was left half-written")
        code = code if isinstance(code, int) else 0
        if standalone_mode:
            sys.exit(code)
        return code


def _handle_sigterm() -> Any:
    """Make SIGTERM unwind like Ctrl-C (temporary folders removed); return the old handler."""
    try:
        return signal.signal(signal.SIGTERM, _terminate)
    except ValueError:  # not the main thread: leave signals alone
        return None


app = typer.Typer(
    cls=OneLineErrors,
    add_completion=False,
    no_args_is_help=True,
    help="nodulab: synthetic lung-nodule data with controlled confounds; one encoder, many losses.",
)


def _choices(name: str, values: Sequence[str]) -> type[Enum]:
    """A str Enum for typer, built from the tuple of valid values the library owns."""
    return Enum(name, {v.replace("-", "_").replace("+", "_"): v for v in values}, type=str)


ExportFormat = _choices("ExportFormat", EXPORT_FORMATS)
Encoder = _choices("Encoder", ENCODERS)
Views = _choices("Views", VIEWS)
Device = _choices("Device", DEVICES)
Selection = _choices("Selection", SELECTIONS)
THRESHOLD_RULES = ("fixed", "val")
"""``metrics.THRESHOLD_RULES``, here so the CLI starts without torch (a test keeps the two equal)."""
ThresholdRule = _choices("ThresholdRule", THRESHOLD_RULES)
EXECUTORS = ("local", "ray")
"""``study.EXECUTORS``, here so the CLI starts without torch (a test keeps the two equal)."""
Executor = _choices("Executor", EXECUTORS)
READERS = ("consensus", "each")
"""``lidc_import.READERS``, here so the CLI starts without pydicom (a test keeps the two equal)."""
ReadersChoice = _choices("ReadersChoice", READERS)


def _progress() -> Progress:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )


@app.command()
def scenarios() -> None:
    """List the preset scenarios."""
    from rich.table import Table

    from nodulab.synth.scenarios import list_presets

    table = Table(title="preset scenarios", show_lines=False)
    table.add_column("name", style="bold")
    table.add_column("description")
    for name, description in list_presets():
        table.add_row(name, description)
    console.print(table)


def _summary(manifest: dict[str, Any]) -> Any:
    """Per split: count, labels and the measured agreement of each confound (a rich Table)."""
    from rich.table import Table

    from nodulab.data.gallery import short_factor

    image, splits = manifest["image"], manifest["splits"]
    confounds = [k for k in next(iter(splits.values()))["cells"][0] if k.startswith("agrees_")]
    source = (
        f"real {manifest['real'].get('source', '')}"
        if manifest.get("kind") == "real"
        else f"{manifest['scenario'].get('name', '')} · seed {manifest['seed']}"
    )
    title = f"{source} · {image['dim']}D {image['size']} px at {image['pixel_mm']:g} mm"
    table = Table(title=title)
    table.add_column("split", no_wrap=True)
    for column in ("n", "benign", "malignant", *(f"agrees\n{short_factor(c)}" for c in confounds)):
        table.add_column(column, justify="right")
    for name, entry in splits.items():
        n = max(entry["n"], 1)
        count = {key: sum(c["count"] for c in entry["cells"] if c[key] == 1) for key in ["label", *confounds]}
        table.add_row(
            name,
            str(entry["n"]),
            str(entry["n"] - count["label"]),
            str(count["label"]),
            *(f"{count[c] / n:.3f}" for c in confounds),
        )
    return table


@app.command()
def generate(
    scenario: Annotated[str, typer.Argument(help="Preset name (`nodulab scenarios`) or a TOML file.")],
    out: Annotated[Path, typer.Option("--out", help="Dataset folder to create.")],
    seed: Annotated[int, typer.Option(min=0, help="Dataset seed; same scenario + seed = same bytes.")] = 0,
    n: Annotated[
        int | None, typer.Option("--n", min=1, max=MAX_N, help=f"Samples in every split (at most {MAX_N:,}).")
    ] = None,
    dim: Annotated[int | None, typer.Option(min=2, max=3, help="2 (patches) or 3 (volumes).")] = None,
    size: Annotated[int | None, typer.Option(min=1, help="Pixels per side.")] = None,
    pixel_mm: Annotated[float | None, typer.Option("--pixel-mm", help="Isotropic spacing in mm.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --out.")] = False,
) -> None:
    """Render a scenario into a dataset folder (images.npy, masks.npy, factors.csv, dataset.json)."""
    from nodulab.data import dataset as data
    from nodulab.synth.renderer import keep_freed_tensors_mapped
    from nodulab.synth.scenarios import load_scenario, resolve

    resolved = resolve(load_scenario(scenario), n=n, dim=dim, size=size, pixel_mm=pixel_mm)
    data.check_out(out, [scenario] if Path(scenario).is_file() else [])
    if out.exists() and not force:
        raise data.DatasetError(f"--out {out} already exists (use --force to replace it)")
    keep_freed_tensors_mapped()  # opt in to glibc's faster setting for this bulk-rendering process
    with _progress() as bar:
        data.generate(resolved, out, seed=seed, force=force, progress=_StageBars(bar))
    console.print(_summary(data.load_manifest(out)))
    if resolved.source is not None:
        from nodulab.synth import twins

        left = ", ".join(f"{split} {k}/{total}" for split, (k, total) in twins.left_out(resolved).items())
        console.print(f"{resolved.source.table} annotations left out (their lesion cannot fit the patch): {left}")
    console.print(f"wrote {out}")


@app.command()
def validate(
    directory: Annotated[Path, typer.Argument(metavar="DIR", help="Dataset folder.")],
    n_rerender: Annotated[
        int,
        typer.Option("--n-rerender", min=0, max=MAX_N, help=f"Rows re-rendered per split (0..{MAX_N:,}; 0 skips it)."),
    ] = 16,
) -> None:
    """Re-check a dataset: hashes, re-render, label balance, confound agreement, diameters.

    A real dataset (import-lidc) is not re-rendered: hashes, shapes, the ratings' scales, masks,
    diameters against the masks, labels against the malignancy rule and no patient in two splits.
    """
    from nodulab.data import validate as validating

    result = validating.validate(directory, n_rerender=n_rerender)
    for check in result.checks:
        mark = "[green]✓[/green]" if check.ok else "[red]✗[/red]"
        console.print(f"{mark} {check.name}: {check.detail}", soft_wrap=True)
    failed = sum(not c.ok for c in result.checks)
    console.print(f"{len(result.checks) - failed}/{len(result.checks)} checks passed")
    if failed:
        raise typer.Exit(1)


@app.command()
def gallery(
    directory: Annotated[Path, typer.Argument(metavar="DIR", help="Dataset folder.")],
    out: Annotated[Path, typer.Option("--out", help="PNG file to write (name ends in .png).")],
    per_cell: Annotated[
        int,
        typer.Option("--per-cell", min=1, max=MAX_PER_CELL, help=f"Samples per cell (1..{MAX_PER_CELL})."),
    ] = 4,
    seed: Annotated[int, typer.Option(min=0, help="Picks which samples are shown.")] = 0,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --out.")] = False,
) -> None:
    """Draw a PNG gallery: one panel per split, one row per (label, agrees) cell.

    A real dataset (import-lidc): one row per (label, readers' spiculation rating >= 4) cell, captions
    with the malignancy and spiculation ratings and the diameter.
    """
    from nodulab.data.gallery import gallery as draw_gallery

    written = draw_gallery(directory, out, per_cell=per_cell, seed=seed, force=force)
    console.print(f"wrote {written}")


@app.command()
def export(
    directory: Annotated[Path, typer.Argument(metavar="DIR", help="Dataset folder.")],
    fmt: Annotated[ExportFormat, typer.Option("--format", help="medmnist (.npz), nifti (.nii.gz) or png.")],
    out: Annotated[Path, typer.Option("--out", help="File (medmnist) or folder to create.")],
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --out.")] = False,
) -> None:
    """Export a dataset (synthetic or real) as a MedMNIST-style .npz, NIfTI volumes or PNG images."""
    from nodulab.data import dataset as data
    from nodulab.data import export as exporting

    data.load_manifest(directory)  # a bad dataset is refused before --out is looked at
    if out.exists() and not force:
        raise data.DatasetError(f"--out {out} already exists (use --force to replace it)")
    with _progress() as bar:
        exporting.export(directory, fmt.value, out, force=force, progress=_StageBars(bar))
    console.print(f"wrote {out}")


def _paragraphs(text: str) -> str:
    """Help text with each paragraph on one line (rich wraps it to the terminal) and ``[`` escaped."""
    return "\n\n".join(" ".join(p.split()) for p in text.strip().split("\n\n")).replace("[", "\\[")


IMPORT_LIDC_HELP = """Import LIDC-IDRI CT from your own copy: one patch per nodule, a real nodulab dataset.

Series are found anywhere under DICOM_ROOT by SeriesInstanceUID (the shipped contours table names
them), read with pydicom (pip install 'nodulab[dicom]'), converted to HU with each slice's rescale
slope and intercept (clipped to [-1024, 3071]), resampled to isotropic --pixel-mm by trilinear
interpolation and cropped around each nodule (the centroid of the region at least half of its
readers outline). Masks: the readers' outline (consensus >= 50%; body only). Label: the median
malignancy rating: at least --malignant gives label 1, at most --benign label 0, in between left out. Splits by patient:
test_lidc (the [source] presets' fixed hash), val, train. A series that cannot be read is skipped
and listed. LIDC-IDRI: CC BY 3.0, Armato et al., Med Phys 2011, doi:10.1118/1.3528204.
"""


@app.command("import-lidc", help=_paragraphs(IMPORT_LIDC_HELP))
def import_lidc(
    dicom_root: Annotated[Path, typer.Argument(metavar="DICOM_ROOT", help="Your LIDC-IDRI copy (any layout).")],
    out: Annotated[Path, typer.Option("--out", help="Dataset folder to create (not inside DICOM_ROOT).")],
    dim: Annotated[int, typer.Option(min=2, max=3, help="2 (the axial plane through the centre) or 3.")] = 2,
    size: Annotated[int, typer.Option(min=1, help="Pixels per side.")] = 64,
    pixel_mm: Annotated[float, typer.Option("--pixel-mm", help="Isotropic spacing of the patches, mm.")] = 0.7,
    readers: Annotated[
        ReadersChoice, typer.Option("--readers", help="consensus: a row per nodule; each: a row per reader.")
    ] = "consensus",  # type: ignore[assignment]
    n: Annotated[int | None, typer.Option("--n", min=1, max=MAX_N, help="At most this many rows.")] = None,
    malignant: Annotated[float, typer.Option("--malignant", help="Median malignancy >= this: label 1.")] = 4,
    benign: Annotated[float, typer.Option("--benign", help="Median malignancy <= this: label 0.")] = 2,
    tables: Annotated[
        Path | None,
        typer.Option(
            "--tables",
            help="A folder with lidc_annotations.csv and lidc_contours.csv.gz in the shipped formats "
            "(default: the shipped tables).",
        ),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --out.")] = False,
) -> None:
    from nodulab.data import dataset as data
    from nodulab.data import lidc_import

    options = lidc_import.Options(
        dim=dim,
        size=size,
        pixel_mm=pixel_mm,
        readers=getattr(readers, "value", readers),
        n=n,
        malignant_from=malignant,
        benign_to=benign,
    )

    def skipped(uid: str, reason: str) -> None:
        console.print(f"skipped series {uid}: {reason}", soft_wrap=True, markup=False)

    with _progress() as bar:
        result = lidc_import.import_lidc(
            dicom_root, out, options=options, tables=tables, force=force, progress=_StageBars(bar), skipped=skipped
        )
    real = result.manifest["real"]
    counts = ", ".join(f"{split} {k}" for split, k in result.counts.items())
    console.print(f"{len(real['series'])} series read, {len(result.skipped)} skipped; rows: {counts}")
    for reason, k in real["left_out"].items():
        console.print(f"left out {k}: {reason}", markup=False)
    if real["padded"]:
        console.print(f"{real['padded']} patches reach outside their scan (padded with -1024 HU)")
    console.print(_summary(data.load_manifest(out)))
    console.print(f"wrote {out}")


REALISM_HELP = """Trace every nodule as a reader would and compare its outline with LIDC-IDRI readers' contours.

Each nodule is thresholded midway between the parenchyma (-860 HU) and its body attenuation
(ground glass / part-solid -650 HU, solid / calcified +30 HU), vessel pixels (mask region 3) left
out as a reader leaves vessels out, holes filled, and the connected component at the nodule
centre ((size-1)/2 + offset/pixel_mm per axis) kept; in 3D its largest axial slice. Solidity, radial
CV, aspect and area-equivalent diameter are measured exactly as on
the shipped LIDC-IDRI table. Groups: lidc_spiculation 1..5 when the rows were drawn from that
table (then the goals are checked), else shape (round vs real spiculation 1; lobulated and
spiculated vs >= 4).

On a real dataset (import-lidc) the same tracer outlines the real patches and each outline is
compared with the readers' outline (the mask): Dice (2D: the patch; 3D: the mask's largest axial
slice vs the traced one's) and diameter error (traced minus readers'), as median, IQR and the
share of Dice >= 0.7, overall, by spiculation rating and by attenuation. LIDC-IDRI: CC BY 3.0,
Armato et al., Med Phys 2011, doi:10.1118/1.3528204.
"""


@app.command(help=_paragraphs(REALISM_HELP))
def realism(
    directory: Annotated[Path, typer.Argument(metavar="DIR", help="Dataset folder.")],
    split: Annotated[
        list[str] | None, typer.Option("--split", help="Split to read, repeatable (default: every split).")
    ] = None,
    n: Annotated[
        int | None,
        typer.Option("--n", min=1, max=MAX_N, help=f"Read at most the first N rows of each split (1..{MAX_N:,})."),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", help=("Folder to create: realism.csv, summary.json, measures.csv, realism.png.")),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --out.")] = False,
) -> None:
    from nodulab.data import dataset as data
    from nodulab.data import realism as realistic

    chosen = realistic.check_splits(directory, split, n)
    if out is not None:
        data.check_out(out, [directory])
        if (out.is_dir() and any(out.iterdir()) or out.exists() and not out.is_dir()) and not force:
            raise data.DatasetError(f"--out {out} already exists (use --force to replace it)")
    with _progress() as bar:
        result = realistic.compare(directory, splits=chosen, n=n, progress=_StageBars(bar))
    for table in realistic.rich_tables(result):
        console.print(table)
    console.print("LIDC-IDRI (CC BY 3.0): " + realistic.lidc.CITATION, soft_wrap=True)
    if out is not None:
        realistic.write(result, out, force=force or out.is_dir())
        console.print(f"wrote {out}")


class _StageBars:
    """A ``train`` progress callback: one rich bar per stage, created on its first report."""

    def __init__(self, bar: Progress) -> None:
        self.bar = bar
        self.tasks: dict[str, Any] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage not in self.tasks:
            self.tasks[stage] = self.bar.add_task(stage, total=total)
        self.bar.update(self.tasks[stage], completed=done, total=total)


CHECKPOINTS_HELP = (
    "Epochs whose weights go to RUN/checkpoints/ (comma-separated, e.g. 1,2,4,8,16, or none; default: "
    "1, 2, 4, ... below --epochs, and the last). Only saved: training and --select never read them "
    "and config.json does not change; `nodulab evaluate` scores them (dynamics.csv)."
)
SELECT_HELP = "Checkpoint: last epoch, or best on val (val shares the training distribution: favours shortcuts)."


VIEWS_HELP = (
    "both: re-rendered nuisance, then flips/90° rotations/shifts (default; views cannot be matched by "
    "their noise). augment: geometry only (the noise pattern matches: SimCLR can pair views without "
    "looking at the lesion). rerender: new nuisance only (the geometry matches)."
)


def loss_help() -> str:
    """``--loss``'s help, read from the loss registry (``hparams.LOSSES``)."""
    return "One of these losses. " + "; ".join(f"{s.name}: {s.summary}" for s in hparams.LOSSES.values()) + "."


def loss_param_help() -> str:
    """``--loss-param``'s help: each parameter, the losses that take it and what it is, from the registry."""
    groups = "; ".join(f"{key} ({', '.join(names)}): {text}" for key, names, text in hparams.param_help())
    return f"Loss parameter KEY=VALUE, repeatable: {groups}. Defaults and tuning ranges: nodulab.training.hparams."


class RegistryHelp(TyperCommand):
    """A command whose ``--loss`` and ``--loss-param`` help is read from the loss registry when it is
    built (on every invocation), so a loss registered after start-up is listed too."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        texts = {"loss": loss_help, "loss_param": loss_param_help}
        for param in self.params:
            if param.name in texts:
                param.help = texts[param.name]()


@app.command("train", cls=RegistryHelp)
def train_command(
    data_dir: Annotated[Path, typer.Argument(metavar="DATA_DIR", help="Dataset folder (train and val).")],
    loss: Annotated[str, typer.Option("--loss", help=loss_help())],
    out: Annotated[Path, typer.Option("--out", help="Run folder to create.")],
    encoder: Annotated[Encoder, typer.Option(help="Encoder architecture.")] = Encoder.small_cnn,
    epochs: Annotated[
        int, typer.Option(help=f"Epochs (1..{MAX_EPOCHS:,}); warm-up then cosine decay.")
    ] = DEFAULT_EPOCHS,
    batch_size: Annotated[
        int,
        typer.Option(
            "--batch-size",
            help=f"Samples per batch (2..{MAX_BATCH_SIZE:,}; 2 views each).",
        ),
    ] = 128,
    lr: Annotated[float, typer.Option(help="AdamW peak learning rate.")] = DEFAULT_LR,
    weight_decay: Annotated[float, typer.Option("--weight-decay", help="AdamW decoupled weight decay.")] = (
        DEFAULT_WEIGHT_DECAY
    ),
    loss_param: Annotated[list[str] | None, typer.Option("--loss-param", help=loss_param_help())] = None,
    seed: Annotated[int, typer.Option(help=f"Seeds weights, batch order and views (0..{MAX_SEED:,}).")] = 0,
    views: Annotated[Views, typer.Option(help=VIEWS_HELP)] = Views.both,
    device: Annotated[Device, typer.Option(help="auto picks cuda when available.")] = Device.auto,
    select: Annotated[Selection, typer.Option("--select", help=SELECT_HELP)] = Selection.last,
    threads: Annotated[
        int | None,
        typer.Option(help=f"torch CPU threads (1..{MAX_THREADS}; default: torch's, at most that); recorded."),
    ] = None,
    checkpoints: Annotated[str | None, typer.Option("--checkpoints", metavar="EPOCHS", help=CHECKPOINTS_HELP)] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing run folder.")] = False,
) -> None:
    """Train one encoder with one loss, fit its readouts and their untrained controls, write the run folder.

    With --checkpoints (default 1, 2, 4, ... and the last epoch) the weights at the end of those
    epochs go to RUN/checkpoints/; only `nodulab evaluate` reads them (dynamics.csv).
    """
    from nodulab.training import loop as training

    try:  # an unknown --loss is refused by train, naming it
        params = hparams.parse_params(loss, loss_param or []) if loss in hparams.LOSSES else {}
    except ValueError as error:
        raise training.TrainError(str(error)) from None
    with _progress() as bar:
        run = training.train(
            data_dir,
            out,
            loss=loss,
            encoder=encoder.value,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            weight_decay=weight_decay,
            loss_params=params,
            seed=seed,
            views=views.value,
            device=device.value,
            selection=select.value,
            threads=threads,
            checkpoints=checkpoints,
            force=force,
            progress=_StageBars(bar),
        )
    console.print(f"wrote {run}")


@app.command()
def evaluate(
    run_dir: Annotated[Path, typer.Argument(metavar="RUN_DIR", help="Run folder of `nodulab train`.")],
    data_dir: Annotated[Path, typer.Argument(metavar="DATA_DIR", help="Dataset folder.")],
    device: Annotated[Device, typer.Option(help="auto picks cuda when available.")] = Device.auto,
    batch_size: Annotated[
        int,
        typer.Option(
            "--batch-size", min=1, max=MAX_BATCH_SIZE, help=f"Images per forward pass (1..{MAX_BATCH_SIZE:,})."
        ),
    ] = 256,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help=(
                "Folder to create for the tables (needed when DATA_DIR is not the run's own dataset, "
                "always with a real one)."
            ),
        ),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --out folder.")] = False,
    threshold: Annotated[
        ThresholdRule,
        typer.Option(
            help=(
                "fixed: 0.5. val: per classifier, the threshold of maximum balanced accuracy on val "
                "(ties: nearest 0.5; on a real dataset, val's malignancy, used for both targets); "
                "never chosen on a test split."
            )
        ),
    ] = ThresholdRule.fixed,
) -> None:
    """Score a run on every split but train and val_balanced; write metrics.csv, groups.csv, evaluation.json.

    Classifiers: head, probe, knn (fitted on train), dfr (fitted on val_balanced: a feature-quality
    oracle), and probe_init, knn_init (the untrained encoder: what the input alone gives away).
    metrics.csv has a sample-level bootstrap 95% interval (ci_low, ci_high: the test samples
    resampled, the model fixed; the variance between seeds is not in it). groups.csv has the
    accuracy of every (label x agrees) cell and the worst group.

    A run with checkpoints (train --checkpoints) on its own dataset also gets dynamics.csv: per
    kept epoch, head and knn (probe at the final epoch) balanced accuracy and AUC on val and the
    conflict splits, and cue, confound and null flip rates on 200 conflict rows.

    A real dataset (nodulab import-lidc, same image geometry, --out needed): val and test_lidc
    are scored against malignancy (split as named) and against spiculation rating >= 4 vs 1
    (<split>_spiculation), with the readouts fitted on the run's synthetic data; groups by
    diameter and rating; no dynamics.
    """
    import json

    import pandas as pd

    from nodulab.explanation import dynamics
    from nodulab.training import evaluation as metrics
    from nodulab.training import loop as training

    # every input is checked before anything is written: the checkpoints dynamics.csv will read too
    follow = dynamics.check_dynamics(
        run_dir, data_dir, out=out, device=training.resolve_device(device.value), force=force
    )
    frame = metrics.evaluate_run(
        run_dir,
        data_dir,
        device=training.resolve_device(device.value),
        batch_size=batch_size,
        out=out,
        force=force,
        threshold=threshold.value,
    )
    folder = out or run_dir
    groups = pd.read_csv(folder / metrics.GROUPS_FILE)
    evaluation = json.loads((folder / metrics.EVALUATION_FILE).read_text(encoding="utf-8"))
    rule = evaluation["threshold"]
    if rule["rule"] == "fixed":
        title = f"{run_dir} · threshold {rule['value']:g}"
    else:
        chosen = ", ".join(f"{c} {rule['values'][c]:.3g}" for c in evaluation["classifiers"])
        title = f"{run_dir} · thresholds chosen on val: {chosen}"
    console.print(metrics.metrics_table(frame, title=title, groups=groups))
    console.print(
        "head: the loss's own; probe, knn: fitted on train; dfr: feature-quality oracle (fitted on "
        "val_balanced); *_init: the untrained encoder (controls)",
        soft_wrap=True,
    )
    if evaluation["dataset"].get("kind") == "real":
        console.print(
            f"real dataset ({metrics.REAL_DATASET}): <split> is scored against malignancy, "
            f"<split>{metrics.SPICULATION_SUFFIX} against spiculation rating >= 4 vs 1; the readouts were "
            f"fitted on the run's {'own real' if evaluation['dataset']['trained_on'] else 'synthetic'} data",
            soft_wrap=True,
        )
    console.print(f"wrote {folder / metrics.METRICS_FILE} (with sample-level 95% intervals), {metrics.GROUPS_FILE}")
    if not (follow and evaluation["dataset"]["trained_on"]):
        return  # dynamics refits the kNN on the run's own train split; a run without checkpoints has none
    from nodulab.synth.renderer import keep_freed_tensors_mapped

    keep_freed_tensors_mapped()  # the switched rows are rendered in bulk
    try:
        with _progress() as bar:
            found = dynamics.dynamics_run(
                run_dir,
                data_dir,
                out=out,
                device=training.resolve_device(device.value),
                force=force,
                progress=_StageBars(bar),
                batch_size=batch_size,
            )
    except dynamics.NoCheckpoints:
        return  # a run trained with --checkpoints none: nothing to follow
    epochs = ", ".join(str(e) for e in dict.fromkeys(found["epoch"]))
    console.print(f"wrote {folder / dynamics.DYNAMICS_FILE} (epochs {epochs})")


@app.command()
def explain(
    run_dir: Annotated[Path, typer.Argument(metavar="RUN_DIR", help="Run folder of `nodulab train`.")],
    data_dir: Annotated[
        Path,
        typer.Argument(
            metavar="DATA_DIR", help="The dataset the run was trained on, or a real dataset of its geometry (--out)."
        ),
    ],
    splits: Annotated[
        list[str] | None,
        typer.Option(
            "--splits", help=("Split to explain, repeatable or comma-separated (default: every test_* split).")
        ),
    ] = None,
    n: Annotated[
        int | None,
        typer.Option("--n", min=1, max=MAX_N, help=f"Explain the first N rows of each split (1..{MAX_N:,})."),
    ] = None,
    device: Annotated[Device, typer.Option(help="auto picks cuda when available.")] = Device.auto,
    batch_size: Annotated[
        int,
        typer.Option(
            "--batch-size", min=1, max=MAX_BATCH_SIZE, help=f"Images per forward pass (1..{MAX_BATCH_SIZE:,})."
        ),
    ] = 256,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing RUN_DIR/explain (or --out).")] = False,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", help="Folder to create for the tables (default RUN_DIR/explain; needed for a real dataset)."
        ),
    ] = None,
) -> None:
    """Counterfactual reliance, sweeps and the cue-reliance index; write RUN_DIR/explain/.

    Each test sample is re-rendered with one factor switched (same seed) and every classifier asked
    again: head (the loss's own), probe and knn (fitted on train), dfr (feature-quality oracle),
    probe_init and knn_init (the untrained encoder: controls).

    A real dataset (nodulab import-lidc, same image geometry, --out needed): probes of the readers'
    ratings and Grad-CAM against the readers' outline, each beside its untrained control; no
    counterfactual switches (a real nodule cannot be re-rendered).
    """
    from nodulab.explanation import counterfactual
    from nodulab.explanation import run as explaining
    from nodulab.synth.renderer import keep_freed_tensors_mapped
    from nodulab.training import loop as training

    chosen = [s for item in splits or [] for s in item.split(",") if s] or None
    keep_freed_tensors_mapped()  # opt in to glibc's faster setting for this bulk-rendering process
    with _progress() as bar:
        tables = explaining.explain_run(
            run_dir,
            data_dir,
            splits=chosen,
            n=n,
            device=training.resolve_device(device.value),
            batch_size=batch_size,
            force=force,
            progress=_StageBars(bar),
            out=out,
        )
    if "reliance" not in tables:  # a real dataset: no switches
        from nodulab.explanation import probes

        if "probes" in tables:
            console.print(probes.probes_table(tables["probes"], title="linear decodability of the ratings"))
        console.print(explaining.NO_SWITCHES, soft_wrap=True)
    else:
        console.print(counterfactual.reliance_table(tables["reliance"]))
    console.print(f"wrote {out or run_dir / counterfactual.EXPLAIN_DIR}")


@app.command("studies")
def list_studies() -> None:
    """List the preset studies."""
    from rich.table import Table

    from nodulab.studies.config import list_presets

    table = Table(title="preset studies")
    table.add_column("name", style="bold")
    table.add_column("description")
    for name, description in list_presets():
        table.add_row(name, description)
    console.print(table)


def _run_line(result: Any) -> str:
    s = result.spec
    where = f"{s.scenario} · {s.loss} · seed {s.seed} · draw {s.draw}"
    if result.status != "done":
        return f"[red]✗[/red] {where}: failed: {result.reason}"
    seconds = sum(result.timings.values())
    return f"[green]✓[/green] {where}: val kNN bal acc {result.score:.3f} · {seconds:.0f} s"


@app.command("study")
def study_command(
    study: Annotated[str, typer.Argument(metavar="STUDY", help="Preset (`nodulab studies`) or a study TOML file.")],
    out: Annotated[Path, typer.Option("--out", help="Study folder: created, or resumed when it holds this study.")],
    executor: Annotated[
        Executor,
        typer.Option(
            help=("local: this machine. ray: one Ray task per run on the cluster RAY_ADDRESS names (else a local one).")
        ),
    ] = Executor.local,
    jobs: Annotated[
        int,
        typer.Option(
            "--jobs",
            min=1,
            max=MAX_JOBS,
            help=f"Local runs at once (1..{MAX_JOBS}; each keeps the study's thread count).",
        ),
    ] = 1,
    device: Annotated[Device, typer.Option(help="auto picks cuda when available.")] = Device.auto,
    cache: Annotated[
        Path | None,
        typer.Option(
            "--cache", help=("Dataset cache, named by content; may be shared by studies (default: OUT/datasets).")
        ),
    ] = None,
    retry_failed: Annotated[bool, typer.Option("--retry-failed", help="Run the failed runs again.")] = False,
    seeds: Annotated[
        int | None,
        typer.Option(
            "--seeds",
            help=(
                "Training seeds 0..N-1 (N >= 1), replacing the study file's `seeds`. On an --out holding "
                "this study it runs only the new seeds' runs; nothing recorded is rerun."
            ),
        ),
    ] = None,
) -> None:
    """Run a study: datasets, every (scenario, loss, seed, draw), evaluate, explain, store, report.

    Resumable: run the same command again after a crash or kill and it continues where it stopped
    (a recorded run is never redone); with more --seeds it runs only the new seeds. Results:
    OUT/results.sqlite, OUT/*.csv, OUT/report.html.

    With `\\[real] dataset = "DIR"` in the study file (a dataset of `nodulab import-lidc` at the study's
    geometry), every run is also scored on real nodules (runs recorded before are scored without
    retraining) and the report adds a sim-to-real section.
    """
    from nodulab.studies.config import load_study
    from nodulab.synth.renderer import keep_freed_tensors_mapped
    from nodulab.training import loop as training

    chosen = load_study(study, seeds=seeds)
    resolved_device = training.resolve_device(device.value)
    keep_freed_tensors_mapped()
    recorded = [0, 0]  # runs recorded, runs in the grid
    try:
        summary = _study(chosen, out, executor.value, jobs, resolved_device, cache, retry_failed, recorded)
    except (KeyboardInterrupt, Terminated) as error:
        kept = (
            f"{recorded[0]} of {recorded[1]} runs are recorded in {Path(out) / 'results.sqlite'}"
            if recorded[1]
            else "no run had started"
        )
        raise _stopped(error, f"{kept}; running runs were stopped; run the same command again to resume") from None
    console.print(
        f"{summary.planned} runs: {summary.skipped} already recorded, {summary.done} done, "
        f"{summary.failed} failed · {summary.wall_seconds:.0f} s"
    )
    if summary.real_scored:
        console.print(f"scored {summary.real_scored} run(s) recorded earlier on the [real] dataset", markup=False)
    for line in summary.real_unscored:
        console.print(f"not scored on the [real] dataset: {line}", markup=False)
    console.print(f"wrote {Path(out) / 'results.sqlite'}, the CSVs and {Path(out) / 'report.html'}")


def _study(
    chosen: Any,
    out: Path,
    executor: str,
    jobs: int,
    device: str,
    cache: Path | None,
    retry_failed: bool,
    recorded: list[int],
) -> Any:
    """``nodulab study`` with its progress bars; ``recorded`` follows (runs recorded, runs in the grid)."""
    from nodulab.studies import driver as studying

    with _progress() as bar:
        datasets = bar.add_task("datasets", total=None)
        grid = bar.add_task("grid", total=None, visible=False)
        stages = _StageBars(bar)

        def on_plan(total: int, already: int) -> None:
            recorded[:] = [already, total]
            bar.update(datasets, visible=False)
            bar.update(grid, completed=already, total=total, visible=True)

        def on_result(result: Any, done: int, total: int) -> None:
            recorded[:] = [done, total]
            bar.update(grid, completed=done, total=total)
            for task in stages.tasks.values():
                bar.remove_task(task)
            stages.tasks.clear()
            bar.console.print(_run_line(result), soft_wrap=True)

        def on_dataset(name: str, rows: int) -> None:
            bar.update(datasets, advance=rows, description=f"rendering {name}")

        return studying.run_study(
            chosen,
            out,
            executor=executor,
            jobs=jobs,
            device=device,
            cache=cache,
            retry_failed=retry_failed,
            on_dataset=on_dataset,
            on_plan=on_plan,
            on_result=on_result,
            progress=stages,
        )


@app.command()
def report(
    directory: Annotated[Path, typer.Argument(metavar="DIR", help="Study folder holding results.sqlite.")],
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help=(
                "HTML file to write, named *.html (default DIR/report.html, always rewritten). An existing "
                "--out is replaced only when it is a nodulab report, or with --force."
            ),
        ),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --out that is not a nodulab report.")] = (
        False
    ),
) -> None:
    """Write one self-contained HTML page of a study's results, read only from DIR/results.sqlite."""
    from nodulab.common.writing import DatasetError, check_out
    from nodulab.results.report import write_report
    from nodulab.results.store import STORE_FILE

    if out is not None:
        store = directory / STORE_FILE
        check_out(out, [store, *(store.with_name(store.name + s) for s in ("-wal", "-shm"))])  # write_report's rule
        if out.suffix.lower() not in (".html", ".htm"):
            raise DatasetError(f"--out {out}: a report is an HTML file; name it *.html")
        if (out.exists() or out.is_symlink()) and not force and not _is_report(out):
            raise DatasetError(f"--out {out} already exists and is not a nodulab report (use --force to replace it)")
    console.print(f"wrote {write_report(directory, out)}")


REPORT_START = b"<!DOCTYPE html>"
REPORT_TITLE = b"<title>nodulab study "


def _is_report(path: Path) -> bool:
    """Whether ``path`` is a regular file (not a link) that ``nodulab report`` wrote: its page and title."""
    if path.is_symlink() or not path.is_file():
        return False
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return False
    return head.startswith(REPORT_START) and REPORT_TITLE in head
