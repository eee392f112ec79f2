"""The results store of a study (design.md "Study, store, report"): one SQLite file,
``DIR/results.sqlite``, in WAL mode.

Tables:

    meta      key, value                      format, study name, the study's identity, sha256 and config
    datasets  scenario, key, manifest_sha256, manifest, gallery (PNG)   (one per scenario and n.train)
    runs      run_id, budget, scenario, loss, seed, draw, selected, config (JSON), status (done | failed),
              reason, warnings, score (the selection score), train_s, evaluate_s, dynamics_s, explain_s, finished
    figures   run_id, name, png                   (``common.tables.RUN_FIGURES``: cam, embedding, history)

and one table per entry of ``common.tables.RESULT_TABLES`` (metrics, groups, the explain tables,
history), built from its declaration: ``run_id``, then the declared columns in their order (the
run folder's; a wide file such as history.csv stored long: epoch, name, value), unique per run on
the declared key, the declared text columns ``TEXT`` and the others ``REAL``.

**Real nodules** (a study's ``[real]``): the runs' scores on a real dataset are rows of ``metrics``
and ``predictions`` with ``dataset`` = ``REAL_DATASET`` (``lidc-idri``; splits ``test_lidc`` and
``test_lidc_spiculation``), which no scenario is named (readers of a run's own scores keep
``dataset == scenario``); meta ``real`` records the real dataset scored (``use_real``). A run scored
after it was recorded (its study gained ``[real]`` later) gets them with ``add_rows``, in one
transaction. Existing stores need no change: the format stays ``nodulab-store/2``.

A run and every row of it go in with one transaction, so a study killed at any moment (SIGKILL
included) leaves either the whole run or none of it; a run is in ``runs`` at most once. Only the
study's driver process writes. ``selected`` marks, per (budget, scenario, loss, seed), the draw
with the best selection score among the finished ones (ties: the lower draw). ``budget`` is the
run's budget cell (``n=1000,epochs=6``: ``studies.config.Cell``).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from nodulab.common.errors import InputError
from nodulab.common.tables import REAL_DATASET, REAL_SPLITS, RESULT_TABLES, ResultTable, write_table  # noqa: F401 - re-exported
from nodulab.common.writing import follow_umask, write_atomically

STORE_FILE = "results.sqlite"
STORE_FORMAT = "nodulab-store/2"
"""2: ``budget`` in ``runs`` and the keys, ``dataset`` in ``metrics``, one dataset per scenario and n.train."""
REAL_META = "real"
"""The meta key recording the real dataset the study scores its runs on (``Store.use_real``)."""
RUN_KEYS = ("run_id", "budget", "scenario", "loss", "seed", "draw", "selected")
"""The key columns every long CSV of a study starts with."""
RUN_COLUMNS = {
    "run_id": "TEXT PRIMARY KEY",
    "budget": "TEXT NOT NULL DEFAULT ''",
    "scenario": "TEXT NOT NULL",
    "loss": "TEXT NOT NULL",
    "seed": "INTEGER NOT NULL",
    "draw": "INTEGER NOT NULL",
    "selected": "INTEGER NOT NULL DEFAULT 0",
    "config": "TEXT NOT NULL",
    "status": "TEXT NOT NULL",
    "reason": "TEXT NOT NULL DEFAULT ''",
    "warnings": "TEXT NOT NULL DEFAULT ''",
    "score": "REAL",
    "train_s": "REAL",
    "evaluate_s": "REAL",
    "dynamics_s": "REAL",
    "explain_s": "REAL",
    "finished": "TEXT",
}


class StoreError(InputError):
    """The store is unreadable, of another format, or holds another study."""


def _quote(name: str) -> str:
    return f'"{name}"'


def _declared(name: str) -> ResultTable:
    if name not in RESULT_TABLES:
        raise StoreError(f"no table {name!r}; tables: {', '.join(RESULT_TABLES)}")
    return RESULT_TABLES[name]


def _schema() -> list[str]:
    statements = [
        "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
        "CREATE TABLE IF NOT EXISTS datasets (scenario TEXT NOT NULL, key TEXT NOT NULL, "
        "manifest_sha256 TEXT NOT NULL, manifest TEXT NOT NULL, gallery BLOB, PRIMARY KEY (scenario, key))",
        "CREATE TABLE IF NOT EXISTS runs (" + ", ".join(f"{c} {t}" for c, t in RUN_COLUMNS.items()) + ")",
        "CREATE TABLE IF NOT EXISTS figures (run_id TEXT NOT NULL REFERENCES runs(run_id), name TEXT NOT NULL, "
        "png BLOB NOT NULL, PRIMARY KEY (run_id, name))",
    ]
    for name, table in RESULT_TABLES.items():
        columns = [f"{_quote(c)} {'TEXT' if c in table.text else 'REAL'}" for c in table.columns]
        unique = ", ".join(_quote(c) for c in ("run_id", *table.key))
        statements.append(
            f"CREATE TABLE IF NOT EXISTS {name} (run_id TEXT NOT NULL REFERENCES runs(run_id), "
            f"{', '.join(columns)}, UNIQUE ({unique}))"
        )
    return statements


def identity(study: Mapping[str, Any]) -> str:
    """What names a study's store: its ``identity`` (``studies.config.Study.identity``: the study
    without its seed count), else its ``sha256``."""
    return str(study.get("identity", study["sha256"]))


def _read_only(path: Path) -> sqlite3.Connection:
    """A read-only connection that leaves no file beside the store: without a ``-wal`` file no
    connection is writing (SQLite removes it when the last one closes), so the file is opened as
    immutable (no ``-shm`` or ``-wal`` created); with one, a plain read-only connection."""
    uri = Path(path).absolute().as_uri() + "?mode=ro"
    if not Path(f"{path}-wal").exists():
        uri += "&immutable=1"
    return sqlite3.connect(uri, uri=True)


def check_owner(path: Path, study: Mapping[str, Any]) -> None:
    """Refuse an existing file that is not this study's store (read-only; nothing is written).

    The store's meta ``identity`` must be the study's (``identity``): a study with another seed
    count is the same study. A store written before meta held an identity has only its study's
    ``sha256`` (seed count included), which must then be the study's ``sha256``; its first resume
    records the identity. A file with no table at all is a store whose study was killed before its
    first commit: it is this study's to take.

    The store is untrusted: every JSON it holds (``meta.config``, each ``runs.config`` and
    ``datasets.manifest``) must be a JSON object, so a store that a resume could not read is
    refused before anything is written into it.
    """
    try:
        db = _read_only(path)
        try:
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            meta = dict(db.execute("SELECT key, value FROM meta").fetchall()) if "meta" in tables else {}
            held = [("meta.config", meta["config"])] if "config" in meta else []
            if "runs" in tables:
                held += [(f"runs.config of {r}", c) for r, c in db.execute("SELECT run_id, config FROM runs")]
            if "datasets" in tables:
                rows = db.execute("SELECT scenario, manifest FROM datasets")
                held += [(f"datasets.manifest of {scenario}", text) for scenario, text in rows]
        finally:
            db.close()
    except sqlite3.DatabaseError as error:
        raise StoreError(f"{path}: not a results store ({error})") from None
    if not tables:
        return
    if meta.get("format") != STORE_FORMAT:
        raise StoreError(f"{path}: store format {meta.get('format')!r}, this nodulab reads {STORE_FORMAT}")
    _check_study(path, meta, study)
    for where, text in held:
        json_object(path, text, where)


def json_object(path: Path, text: Any, where: str) -> dict[str, Any]:
    """A JSON object the store at ``path`` holds; anything else is a one-line ``StoreError`` (the file is untrusted)."""
    try:
        value = json.loads(text)
    except (TypeError, ValueError, RecursionError):
        raise StoreError(f"{path}: {where} is not valid JSON") from None
    if not isinstance(value, dict):
        raise StoreError(f"{path}: {where} is not a JSON object (got {type(value).__name__})")
    return value


def _check_study(path: Path, meta: Mapping[str, str], study: Mapping[str, Any]) -> None:
    """Refuse a store whose meta names another study than ``study`` (``check_owner``)."""
    key, mine = ("identity", identity(study)) if "identity" in meta else ("sha256", str(study["sha256"]))
    if meta.get(key) != mine:
        raise StoreError(
            f"{path}: holds study {meta.get('name')!r} ({str(meta.get(key))[:12]}), not this study "
            f"{study['name']!r} ({mine[:12]}); use another --out"
        )


class Store:
    """An open results store. Use as a context manager; only one process should write.

    Args:
        path: the SQLite file.
        study: ``{"name", "sha256", "config"}`` and optionally ``"identity"`` (default: the
            sha256) of the study that owns the store. An existing store must hold the same identity
            (``check_owner``, else ``StoreError``); the meta then records this study (a resume with
            another seed count updates ``sha256`` and ``config``, so the report reads the seeds
            now run). ``None`` opens an existing store read-only (``nodulab report``).
    """

    def __init__(self, path: Path | str, study: Mapping[str, Any] | None = None) -> None:
        self.path = Path(path)
        if study is None:
            if not self.path.is_file():
                raise StoreError(f"{self.path}: no results store here")
            self._db = _read_only(self.path)
            self._check_format()
            return
        existed = self.path.exists()
        if existed:  # check whose store it is before writing anything into it
            check_owner(self.path, study)
        self._db = sqlite3.connect(self.path)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            if not existed:
                follow_umask(self.path)
            with self._db:
                for statement in _schema():
                    self._db.execute(statement)
                self._db.execute("INSERT OR IGNORE INTO meta VALUES ('format', ?)", (STORE_FORMAT,))
                held = self.meta()  # again, inside the write transaction (a new store holds no study yet)
                if "identity" in held or "sha256" in held:
                    _check_study(self.path, held, study)
                owner = {
                    "name": str(study["name"]),
                    "identity": identity(study),
                    "sha256": str(study["sha256"]),
                    "config": json.dumps(study["config"], sort_keys=True),
                }  # check_owner passed: the same study, maybe with another seed count, which is now the one run
                self._db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", owner.items())
        except sqlite3.DatabaseError as error:
            self._db.close()
            raise StoreError(f"{self.path}: not a results store ({error})") from None
        except StoreError:
            self._db.close()
            raise

    def _check_format(self) -> None:
        try:
            found = self.meta().get("format")
        except sqlite3.DatabaseError as error:
            self._db.close()
            raise StoreError(f"{self.path}: not a results store ({error})") from None
        if found != STORE_FORMAT:
            self._db.close()
            raise StoreError(f"{self.path}: store format {found!r}, this nodulab reads {STORE_FORMAT}")

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._db.close()

    def meta(self) -> dict[str, str]:
        return dict(self._db.execute("SELECT key, value FROM meta").fetchall())

    def study_config(self) -> dict[str, Any]:
        return self._object(self.meta().get("config"), "meta.config")

    def _object(self, text: Any, where: str) -> dict[str, Any]:
        """A JSON object the store holds (``json_object``)."""
        return json_object(self.path, text, where)

    def finished(self) -> set[str]:
        """run_ids recorded, done or failed: a resumed study never redoes them."""
        return {row[0] for row in self._db.execute("SELECT run_id FROM runs")}

    def forget_failed(self) -> int:
        """Remove the runs recorded as failed (``--retry-failed``); returns how many."""
        with self._db:
            return self._db.execute("DELETE FROM runs WHERE status='failed'").rowcount

    def add_dataset(
        self, scenario: str, key: str, manifest_sha256: str, manifest: Mapping[str, Any], gallery: bytes | None
    ) -> None:
        with self._db:
            row = (scenario, key, manifest_sha256, json.dumps(manifest, sort_keys=True), gallery)
            self._db.execute("INSERT OR REPLACE INTO datasets VALUES (?, ?, ?, ?, ?)", row)

    def add_run(
        self,
        run: Mapping[str, Any],
        tables: Mapping[str, pd.DataFrame] | None = None,
        figures: Mapping[str, bytes] | None = None,
    ) -> None:
        """Record one run with all its rows in one transaction, then update the cell's selection.

        ``run`` has the ``runs`` columns (``config`` as a dict; ``selected`` is computed here).
        """
        record = {c: run.get(c) for c in RUN_COLUMNS}
        record["config"] = json.dumps(run["config"], sort_keys=True)
        record["selected"] = 0
        record["reason"] = run.get("reason") or ""
        record["warnings"] = run.get("warnings") or ""
        record["budget"] = run.get("budget") or ""
        with self._db:
            marks = ", ".join("?" * len(RUN_COLUMNS))
            self._db.execute(
                f"INSERT INTO runs ({', '.join(RUN_COLUMNS)}) VALUES ({marks})", [record[c] for c in RUN_COLUMNS]
            )
            self._insert(record["run_id"], tables or {})
            for name, png in (figures or {}).items():
                self._db.execute("INSERT INTO figures VALUES (?, ?, ?)", (record["run_id"], name, png))
            self._select(record["budget"], record["scenario"], record["loss"], int(record["seed"]))

    def _insert(self, run_id: str, tables: Mapping[str, pd.DataFrame]) -> None:
        """Insert a run's rows of each table (inside the caller's transaction)."""
        for name, frame in tables.items():
            columns = _declared(name).columns
            missing = [c for c in columns if c not in frame.columns]
            if missing:
                raise StoreError(f"run {run_id}: table {name} lacks {', '.join(missing)}")
            rows = frame[list(columns)].astype(object).where(frame[list(columns)].notna(), None)
            placeholders = ", ".join("?" * (len(columns) + 1))
            names = ", ".join(map(_quote, columns))
            self._db.executemany(
                f"INSERT INTO {name} (run_id, {names}) VALUES ({placeholders})",
                [(run_id, *values) for values in rows.itertuples(index=False)],
            )

    def add_rows(self, run_id: str, tables: Mapping[str, pd.DataFrame]) -> None:
        """Add rows to a recorded run (its scores on the real dataset, scored after it was recorded),
        all in one transaction: every row or none."""
        if not self._db.execute("SELECT 1 FROM runs WHERE run_id=?", (run_id,)).fetchone():
            raise StoreError(f"run {run_id}: not recorded, so it cannot take rows")
        with self._db:
            self._insert(run_id, tables)

    def scored_on(self, dataset: str) -> set[str]:
        """run_ids with ``metrics`` rows of ``dataset`` (``REAL_DATASET``: the runs already scored on real nodules)."""
        return {row[0] for row in self._db.execute("SELECT DISTINCT run_id FROM metrics WHERE dataset=?", (dataset,))}

    def real(self) -> dict[str, Any] | None:
        """The real dataset the study scores its runs on (meta ``real``), or None."""
        text = self.meta().get(REAL_META)
        return None if text is None else self._object(text, f"meta.{REAL_META}")

    def use_real(self, record: Mapping[str, Any]) -> int:
        """Record the real dataset the study now scores on (``record``: its ``dataset`` path, ``manifest_sha256``,
        ...). When it replaces another (another manifest sha256), the scores on the old one (``REAL_DATASET``
        rows of ``metrics`` and ``predictions``) are removed in the same transaction, so that every run is scored
        again on the new one; returns how many rows were removed."""
        held = self.real()
        removed = 0
        with self._db:
            if held is not None and held.get("manifest_sha256") != record.get("manifest_sha256"):
                for name in ("metrics", "predictions"):
                    removed += self._db.execute(f"DELETE FROM {name} WHERE dataset=?", (REAL_DATASET,)).rowcount
            self._db.execute(
                "INSERT OR REPLACE INTO meta VALUES (?, ?)", (REAL_META, json.dumps(dict(record), sort_keys=True))
            )
        return removed

    def _select(self, budget: str, scenario: str, loss: str, seed: int) -> None:
        cell = (budget, scenario, loss, seed)
        where = "budget=? AND scenario=? AND loss=? AND seed=?"
        best = self._db.execute(
            f"SELECT run_id FROM runs WHERE {where} AND status='done' AND score IS NOT NULL "
            "ORDER BY score DESC, draw ASC LIMIT 1",
            cell,
        ).fetchone()
        self._db.execute(f"UPDATE runs SET selected=0 WHERE {where}", cell)
        if best:
            self._db.execute("UPDATE runs SET selected=1 WHERE run_id=?", best)

    def runs(self) -> pd.DataFrame:
        """Every recorded run (``config`` parsed), in grid order."""
        frame = pd.read_sql_query("SELECT * FROM runs ORDER BY budget, scenario, loss, seed, draw", self._db)
        frame["config"] = [self._object(c, f"runs.config of {r}") for c, r in zip(frame["config"], frame["run_id"])]
        return frame

    def table(self, name: str) -> pd.DataFrame:
        """A result table joined with the run keys: ``RUN_KEYS`` then the run folder's columns.

        A table declared after the store was made (a read-only store never gets it) reads as empty.
        """
        declared = _declared(name).columns
        found = self._db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (name,)).fetchone()
        if not found:
            return pd.DataFrame(columns=[*RUN_KEYS, *declared])
        keys = ", ".join(f"r.{c}" for c in RUN_KEYS)
        columns = ", ".join(f"t.{_quote(c)}" for c in declared)
        return pd.read_sql_query(
            f"SELECT {keys}, {columns} FROM {name} t JOIN runs r USING (run_id) "
            "ORDER BY r.budget, r.scenario, r.loss, r.seed, r.draw, t.rowid",
            self._db,
        )

    def datasets(self) -> pd.DataFrame:
        return pd.read_sql_query("SELECT * FROM datasets ORDER BY scenario, rowid", self._db)

    def recorded_datasets(self) -> set[tuple[str, str]]:
        """``(scenario, key)`` of every dataset recorded."""
        return {tuple(row) for row in self._db.execute("SELECT scenario, key FROM datasets")}

    def manifests(self) -> dict[str, dict[str, Any]]:
        """Each scenario's dataset manifest (its ``dataset.json``; the first recorded where budget
        cells resize the training split: the confounds and test splits are the same), parsed."""
        rows = self._db.execute("SELECT scenario, manifest FROM datasets ORDER BY rowid")
        found: dict[str, dict[str, Any]] = {}
        for scenario, text in rows:
            found.setdefault(scenario, self._object(text, f"datasets.manifest of {scenario}"))
        return found

    def figure(self, run_id: str, name: str) -> bytes | None:
        row = self._db.execute("SELECT png FROM figures WHERE run_id=? AND name=?", (run_id, name)).fetchone()
        return row[0] if row else None


def export_csvs(store: Store, out: Path) -> list[Path]:
    """Write ``out/<table>.csv`` (and ``runs.csv``) from the store, each file atomically."""
    written = []
    runs = store.runs().drop(columns=["config"])
    frames = {"runs": runs, **{name: store.table(name) for name, table in RESULT_TABLES.items() if table.exported}}
    for name, frame in frames.items():
        path = Path(out) / f"{name}.csv"
        write_atomically(path, lambda tmp, f=frame: write_table(f, tmp))
        written.append(path)
    return written
