"""A result table is declared once (``common.tables.RESULT_TABLES``): the store, its CSVs and the runner read it.

A toy table declared here (and nowhere else) gets its store table, its exported CSV in the declared
column order, and is read back from a run folder by the runner; every real writer writes the
columns declared for it (a one-run study, below).
"""

from __future__ import annotations

import json
import math
import sqlite3
from pathlib import Path

import pandas as pd
import pytest

from nodulab.common.tables import RESULT_TABLES, RUN_FIGURES, ResultTable
from nodulab.results.store import RUN_KEYS, STORE_FILE, Store, StoreError, _schema, export_csvs
from nodulab.studies.runner import SELECTION_SCORE, _read_back

TOY = ResultTable(
    "explain/toy.csv",
    ("split", "thing", "score", "note"),  # not alphabetical, the key not contiguous
    key=("split", "thing"),
    text=("split", "thing", "note"),
)
STUDY = {"name": "toy", "sha256": "cd" * 32, "config": {}}
FROZEN_SCHEMA = (
    'CREATE TABLE IF NOT EXISTS metrics (run_id TEXT NOT NULL REFERENCES runs(run_id), "dataset" TEXT, '
    '"split" TEXT, "classifier" TEXT, "metric" TEXT, "value" REAL, "ci_low" REAL, "ci_high" REAL, '
    'UNIQUE ("run_id", "dataset", "split", "classifier", "metric"))',
    'CREATE TABLE IF NOT EXISTS groups (run_id TEXT NOT NULL REFERENCES runs(run_id), "split" TEXT, '
    '"classifier" TEXT, "label" TEXT, "group" TEXT, "n" REAL, "accuracy" REAL, '
    'UNIQUE ("run_id", "split", "classifier", "label", "group"))',
    'CREATE TABLE IF NOT EXISTS reliance (run_id TEXT NOT NULL REFERENCES runs(run_id), "split" TEXT, '
    '"classifier" TEXT, "factor" TEXT, "kind" TEXT, "value_from" TEXT, "value_to" TEXT, "n" REAL, '
    '"flip_rate" REAL, "delta_p" REAL, "in_support" REAL, "null_flip_rate" REAL, "excess_flip_rate" REAL, '
    '"excess_low" REAL, "excess_high" REAL, "degenerate" REAL, UNIQUE ("run_id", "split", "classifier", '
    '"factor", "kind", "value_from", "value_to"))',
    'CREATE TABLE IF NOT EXISTS sweep (run_id TEXT NOT NULL REFERENCES runs(run_id), "split" TEXT, '
    '"classifier" TEXT, "factor" TEXT, "value" REAL, "mean_p" REAL, "n" REAL, '
    'UNIQUE ("run_id", "split", "classifier", "factor", "value"))',
    'CREATE TABLE IF NOT EXISTS cue (run_id TEXT NOT NULL REFERENCES runs(run_id), "split" TEXT, '
    '"classifier" TEXT, "confound" TEXT, "label_only" REAL, "confound_only" REAL, "both" REAL, "neither" REAL, '
    'UNIQUE ("run_id", "split", "classifier", "confound"))',
    'CREATE TABLE IF NOT EXISTS probes (run_id TEXT NOT NULL REFERENCES runs(run_id), "factor" TEXT, '
    '"target" TEXT, "metric" TEXT, "score" REAL, "control" TEXT, '
    'UNIQUE ("run_id", "factor", "target", "metric", "control"))',
    'CREATE TABLE IF NOT EXISTS cam (run_id TEXT NOT NULL REFERENCES runs(run_id), "split" TEXT, '
    '"classifier" TEXT, "region" TEXT, "mass" REAL, "area_share" REAL, '
    'UNIQUE ("run_id", "split", "classifier", "region"))',
    'CREATE TABLE IF NOT EXISTS history (run_id TEXT NOT NULL REFERENCES runs(run_id), "epoch" REAL, '
    '"name" TEXT, "value" REAL, UNIQUE ("run_id", "epoch", "name"))',
)
"""The result tables of every store of this format (``nodulab-store/2``): a declaration must keep them."""


@pytest.fixture
def toy(monkeypatch: pytest.MonkeyPatch) -> ResultTable:
    monkeypatch.setitem(RESULT_TABLES, "toy", TOY)
    return TOY


def _run(run_id: str) -> dict:
    return {"run_id": run_id, "scenario": "clean", "loss": "ce", "seed": 0, "draw": 0, "config": {}, "status": "done"}


def _toy_frame() -> pd.DataFrame:
    # columns in another order than declared, and one more: the store takes the declared ones, in order
    return pd.DataFrame(
        {"note": ["007", "1.50"], "extra": [1, 2], "score": [0.25, math.nan], "thing": ["a", "NA"], "split": "x"}
    )


def test_existing_stores_keep_their_schema() -> None:
    schema = _schema()
    assert [s for s in schema if s in FROZEN_SCHEMA] == list(FROZEN_SCHEMA)  # each, in the same order


def test_a_declaration_names_only_its_own_columns() -> None:
    with pytest.raises(ValueError, match="key names columns"):
        ResultTable("t.csv", ("a", "b"), key=("c",), text=())
    with pytest.raises(ValueError, match="text names columns"):
        ResultTable("t.csv", ("a", "b"), key=("a",), text=("z",))
    with pytest.raises(ValueError, match="three columns"):
        ResultTable("t.csv", ("a", "b"), key=("a",), text=(), wide=True)
    assert TOY.file_name == "toy.csv" and RESULT_TABLES["history"].file_name == "history.csv"


def test_a_declared_table_is_in_the_store_and_its_csv(toy: ResultTable, tmp_path: Path) -> None:
    statement = (
        'CREATE TABLE IF NOT EXISTS toy (run_id TEXT NOT NULL REFERENCES runs(run_id), "split" TEXT, "thing" TEXT, '
        '"score" REAL, "note" TEXT, UNIQUE ("run_id", "split", "thing"))'
    )
    assert _schema()[-1] == statement
    with Store(tmp_path / STORE_FILE, study=STUDY) as store:
        store.add_run(_run("r1"), {"toy": _toy_frame()})
        frame = store.table("toy")
        assert tuple(frame.columns) == (*RUN_KEYS, *toy.columns)
        assert (
            list(frame["note"]) == ["007", "1.50"]
            and list(frame["thing"]) == ["a", "NA"]
            and frame["score"].iloc[0] == 0.25
        )  # text stays text
        assert math.isnan(frame["score"].iloc[1])
        with pytest.raises(sqlite3.IntegrityError):  # unique on the declared key within a run
            store.add_run(_run("r2"), {"toy": pd.concat([_toy_frame(), _toy_frame()])})
        with pytest.raises(StoreError, match="toy lacks note"):
            store.add_run(_run("r3"), {"toy": _toy_frame().drop(columns="note")})
        assert store.finished() == {"r1"}  # a refused run leaves nothing
        written = export_csvs(store, tmp_path)
    exported = [f"{name}.csv" for name, table in RESULT_TABLES.items() if table.exported]
    assert [p.name for p in written] == ["runs.csv", *exported]
    assert "predictions.csv" not in exported  # the per-sample rows stay in the store
    lines = (tmp_path / "toy.csv").read_text().splitlines()
    assert lines == [
        ",".join((*RUN_KEYS, *toy.columns)),
        "r1,,clean,ce,0,0,0,x,a,0.25,007",
        "r1,,clean,ce,0,0,0,x,NA,nan,1.50",
    ]
    db = sqlite3.connect(tmp_path / STORE_FILE)
    assert db.execute('SELECT typeof("note"), typeof("score") FROM toy LIMIT 1').fetchone() == ("text", "real")
    db.close()


def test_a_store_made_before_a_table_was_declared_still_opens(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with Store(tmp_path / STORE_FILE, study=STUDY) as store:
        store.add_run(_run("r1"))
    monkeypatch.setitem(RESULT_TABLES, "toy", TOY)
    with Store(tmp_path / STORE_FILE) as store:  # read-only, as the report opens it: the table reads empty
        assert store.table("toy").empty and tuple(store.table("toy").columns) == (*RUN_KEYS, *TOY.columns)
        with pytest.raises(StoreError, match="no table 'nothing'"):
            store.table("nothing")
    with Store(tmp_path / STORE_FILE, study=STUDY) as store:  # a resumed study adds it
        store.add_run(_run("r2"), {"toy": _toy_frame()})
        assert list(store.table("toy")["run_id"]) == ["r2", "r2"]


def _run_folder(run_dir: Path) -> Path:
    """A run folder with the files the runner reads: config, a wide history, a figure."""
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps({"selected_epoch": 2}))
    (run_dir / "history.csv").write_text(f"epoch,train_loss,{SELECTION_SCORE}\n1,0.5,0.6\n2,0.25,0.75\n")
    (run_dir / RUN_FIGURES["history"]).write_bytes(b"png")
    return run_dir


def test_the_runner_reads_back_every_declared_file(toy: ResultTable, tmp_path: Path) -> None:
    run_dir = _run_folder(tmp_path / "run")
    tables, figures, score = _read_back(run_dir)
    assert set(tables) == {"history"} and figures == {"history": b"png"} and score == 0.75
    assert tuple(tables["history"].columns) == RESULT_TABLES["history"].columns  # the wide file, stored long
    assert len(tables["history"]) == 4
    (run_dir / "explain").mkdir()
    (run_dir / toy.file).write_text("split,thing,score,note\nx,a,0.25,007\nx,NA,nan,1.50\n")
    tables, _, _ = _read_back(run_dir)
    assert set(tables) == {"history", "toy"}
    pd.testing.assert_frame_equal(
        tables["toy"],
        pd.DataFrame({"split": "x", "thing": ["a", "NA"], "score": [0.25, math.nan], "note": ["007", "1.50"]}),
    )
    with Store(tmp_path / STORE_FILE, study=STUDY) as store:  # and the store takes what the runner read
        store.add_run(_run("r1"), tables)
        assert list(store.table("toy")["note"]) == ["007", "1.50"]


def assert_runs_hold_their_declarations(out: Path) -> set[str]:
    """Every done run folder of the study in ``out`` against ``RESULT_TABLES`` (used by a study test).

    Each declared file a run folder has carries exactly the declared columns, in order (a wide one:
    its id column first, then one column per name), and the store holds what the runner reads back
    from it; a table whose file a run lacks has no row of that run. Returns the tables found.
    """
    found = set()
    with Store(out / STORE_FILE) as store:
        runs = store.runs()
        stored = {name: store.table(name) for name in RESULT_TABLES}
    for run_id in runs.loc[runs["status"] == "done", "run_id"]:
        run_dir = out / "runs" / run_id
        back, _, _ = _read_back(run_dir)
        for name, table in RESULT_TABLES.items():
            rows = stored[name][stored[name]["run_id"] == run_id].drop(columns=list(RUN_KEYS))
            if not (run_dir / table.file).is_file():
                assert rows.empty, (run_id, name)
                continue
            found.add(name)
            header = tuple((run_dir / table.file).read_text().splitlines()[0].split(","))
            assert header[:1] == table.columns[:1] if table.wide else header == table.columns, (name, header)
            assert tuple(back[name].columns) == table.columns
            pd.testing.assert_frame_equal(
                rows.reset_index(drop=True), back[name].reset_index(drop=True), check_dtype=False, obj=name
            )
    return found
