"""The study report: a self-contained page from made-up stores, its degraded forms, the CLI, a real browser."""

from __future__ import annotations

import base64
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import assert_one_line_error
from fake_study import make_study, manifest
from nodulab.cli import app
from nodulab.data.dataset import DatasetError
from nodulab.results.report import REPORT_FILE, write_report
from nodulab.results.store import STORE_FILE, Store

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
PNG = b"\x89PNG\r\n\x1a\n"
IMAGE = re.compile(r"<img src='data:image/png;base64,([A-Za-z0-9+/=]+)'")


def score(scenario: str, loss: str, seed: int, split: str) -> float:
    base = {"val": 0.97, "test_iid": 0.95, "test_conflict": 0.6}[split]
    return base + (0.2 if loss == "supcon" and split == "test_conflict" else 0.0) + 0.01 * ((seed * 7 + len(loss)) % 3)


@pytest.fixture(scope="module")
def full_report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two scenarios, two losses, four seeds, two tuning draws, one failed run, every explain table."""
    root = make_study(
        tmp_path_factory.mktemp("study") / "study",
        score,
        seeds=(0, 1, 2, 3),
        losses=("ce", "supcon"),
        draws=2,
        failed=[("size-confound", "supcon", 3)],
    )
    return write_report(root)


def images_of(text: str) -> list[bytes]:
    return [base64.b64decode(data) for data in IMAGE.findall(text)]


def assert_self_contained(text: str) -> None:
    """No script, no external URL; every image is an inline, valid PNG."""
    assert "<script" not in text.lower() and "http://" not in text and "https://" not in text
    assert text.count("<img") == len(images_of(text)) > 0
    assert all(png.startswith(PNG) and len(png) > 100 for png in images_of(text))


def test_report_shows_every_section_self_contained(full_report: Path) -> None:
    text = full_report.read_text(encoding="utf-8")
    assert full_report.name == REPORT_FILE
    assert_self_contained(text)
    for anchor in ("study", "findings", "datasets", "scores", "differences", "reliance", "figures"):
        assert f"<section id='{anchor}'>" in text
    assert "per seed, the draw with the best kNN balanced accuracy on val; budget 2 draws per loss" in text
    assert "size-confound-supcon-3-0" in text and "loss became NaN at epoch 3" in text  # the failed run, its reason
    assert "On size-confound/test_conflict, ce (head) reaches balanced accuracy" in text
    assert "test-selected oracle (upper bound)" in text and "dfr (feature-quality oracle)" in text
    assert "probe_init (untrained control)" in text and "IID: shares the training distribution" in text
    assert "supcon (probe) − ce (head)" in text and "significant</span>" in text
    # galleries 2; per scenario reliance, sweep, probes, 2 Grad-CAM, 2 embeddings, 1 training-curve plot
    assert len(images_of(text)) == 2 + 2 * (3 + 2 + 2 + 1)


def test_report_oracle_is_apart_and_above_the_selected_draw(full_report: Path) -> None:
    text = full_report.read_text(encoding="utf-8")
    oracle = text.split("ce · test-selected oracle (upper bound)</td>")[1].split("</tr>")[0]
    selected = text.split("<b>ce</b>")[1].split("</tr>")[0]  # the same (clean) scenario's ce row
    # the made-up draw 1 scores 0.02 more than the selected draw 0 on every split
    assert float(oracle.split("<td>")[1][:4]) == pytest.approx(float(selected.split("<b>")[1][:4]) + 0.02, abs=0.011)


def test_report_degrades_into_sentences(tmp_path: Path) -> None:
    """One seed, failed runs, no explain tables, no clean scenario, a missing gallery: sentences, no empty image."""
    root = make_study(
        tmp_path / "s",
        score,
        seeds=(0,),
        losses=("ce", "supcon", "simclr"),
        scenarios=("size-confound",),
        explain=False,
        failed=[("size-confound", "simclr", 0)],
    )
    with Store(root / STORE_FILE, study=_study_of(root)) as store:
        store.add_dataset("size-confound", "key-size-confound", "0" * 64, manifest("size-confound"), None)
    text = write_report(root).read_text(encoding="utf-8")
    assert "<img" not in text or text.count("<img") == len(images_of(text))
    assert "No explain tables for this scenario" in text and "no clean scenario" in text
    assert "with 1 seed the study cannot tell" in text and "cannot tell (1 seed)" in text
    assert "dataset gallery of size-confound: not in the store." in text
    assert "No Grad-CAM stored for this scenario." in text and "test-selected oracle" not in text
    assert "loss became NaN at epoch 3" in text and "(1 seed)" in text


def _study_of(root: Path) -> dict:
    with Store(root / STORE_FILE) as store:
        meta = store.meta()
        return {"name": meta["name"], "sha256": meta["sha256"], "config": store.study_config()}


def test_report_of_an_empty_store(tmp_path: Path) -> None:
    with Store(tmp_path / STORE_FILE, study={"name": "empty", "sha256": "0" * 64, "config": {}}):
        pass
    text = write_report(tmp_path).read_text(encoding="utf-8")
    assert "No run is recorded in the store yet." in text and "nothing to report" in text and "<img" not in text


def test_cli_report_and_its_one_line_errors(full_report: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "page.html"
    result = runner.invoke(app, ["report", str(full_report.parent), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert out.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert_one_line_error(runner.invoke(app, ["report", str(tmp_path / "nowhere")]), "no results store here")
    (tmp_path / STORE_FILE).write_bytes(b"not a database, just bytes " * 100)
    assert_one_line_error(runner.invoke(app, ["report", str(tmp_path)]), "not a results store")
    store = full_report.parent / STORE_FILE
    before = store.read_bytes()
    assert_one_line_error(runner.invoke(app, ["report", str(full_report.parent), "--out", str(store)]), "input")
    assert store.read_bytes() == before


def test_write_report_refuses_to_replace_the_store(full_report: Path) -> None:
    with pytest.raises(DatasetError):
        write_report(full_report.parent, out=full_report.parent / STORE_FILE)


def test_report_loads_no_torch() -> None:
    code = "import sys, nodulab.results.report, nodulab.results.findings; print('torch' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    assert (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout.strip()
        == "False"
    )


def test_gallery_png_is_the_gallery_file(tmp_path: Path) -> None:
    from nodulab.data import dataset as data
    from nodulab.data.gallery import gallery, gallery_png
    from nodulab.synth.scenarios import load_scenario, resolve

    root = tmp_path / "ds"
    data.generate(resolve(load_scenario("clean"), n=4, size=32, pixel_mm=1.4), root, seed=0)
    png = gallery_png(root, per_cell=1)
    assert png.startswith(PNG) and png == gallery(root, tmp_path / "g.png", per_cell=1).read_bytes()


def _missing_browser() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install 'selenium>=4.15')"
    for path in (CHROMIUM, CHROMEDRIVER):
        if not Path(path).exists():
            return f"{path} is missing (apt-get install chromium chromium-driver)"
    return None


@pytest.fixture
def browser(tmp_path: Path):
    """Debian's headless chromium through selenium; under CI (``CI`` set) a missing browser fails the test."""
    reason = _missing_browser()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"the browser test must run under CI: {reason}")
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        "--window-size=1400,1000",
    ):
        options.add_argument(argument)
    options.binary_location = CHROMIUM
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def page_problems(driver, page: Path) -> list[str]:
    """SEVERE console entries and images that did not load, after opening ``page``."""
    driver.get(page.resolve().as_uri())
    problems = [f"console: {e['message']}" for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    images = driver.execute_script("return Array.from(document.images, i => [i.alt, i.complete, i.naturalWidth]);")
    problems += [f"image {alt!r} not loaded" for alt, complete, width in images if not complete or width == 0]
    return problems if images else [*problems, "no image on the page"]


def test_report_renders_in_headless_chromium(browser, full_report: Path, tmp_path: Path) -> None:
    assert page_problems(browser, full_report) == []
    height = browser.execute_script("return document.documentElement.scrollHeight;")
    browser.set_window_size(1400, min(height, 16000))
    shot = tmp_path / "report.png"
    assert browser.save_screenshot(str(shot))
    from PIL import Image

    with Image.open(shot) as image:
        assert shot.read_bytes().startswith(PNG) and image.width >= 1300 and image.height > 1000
    broken = tmp_path / "broken.html"  # the check itself can fail: a page with a broken image
    broken.write_text(
        full_report.read_text(encoding="utf-8").replace(
            "</body>", "<img src='data:image/png;base64,AAAA' alt='broken'></body>"
        ),
        encoding="utf-8",
    )
    assert page_problems(browser, broken) == ["image 'broken' not loaded"]


@pytest.mark.parametrize(
    ("sql", "fragment"),
    [
        ("UPDATE meta SET value = '{not json' WHERE key = 'config'", "meta.config is not valid JSON"),
        ("UPDATE meta SET value = '[1, 2]' WHERE key = 'config'", "meta.config is not a JSON object (got list)"),
        ("UPDATE runs SET config = 'nan nan' WHERE rowid = 1", "runs.config of"),
        ("UPDATE runs SET config = '\"text\"' WHERE rowid = 1", "is not a JSON object (got str)"),
        ("UPDATE datasets SET manifest = '' WHERE rowid = 1", "datasets.manifest of"),
    ],
)
def test_a_store_with_malformed_json_is_one_line(tmp_path: Path, sql: str, fragment: str) -> None:
    import sqlite3

    root = make_study(tmp_path / "s", score, seeds=(0,), losses=("ce",), explain=False)
    db = sqlite3.connect(root / STORE_FILE)
    with db:
        db.execute(sql)
    db.close()
    assert_one_line_error(CliRunner().invoke(app, ["report", str(root)]), fragment)
    assert not (root / "report.html").exists()


NUMBER = re.compile(r"(?<![\w.])[-+−]?(\d+\.\d+)")


def _numbers(fragment: str) -> set[str]:
    """Decimal numbers of an HTML fragment, unsigned (``+0.20``, ``−0.20`` and ``0.20`` are one)."""
    return set(NUMBER.findall(re.sub(r"<[^>]+>", " ", fragment)))


def assert_findings_numbers_in_tables(text: str) -> None:
    """Every decimal number of every finding is in a table of the page (counts and levels are exempt)."""
    findings = re.search(r"<ul class='findings'>(.*?)</ul>", text, re.S)
    assert findings is not None
    tables = _numbers("".join(re.findall(r"<table>.*?</table>", text, re.S)))
    for sentence in re.findall(r"<li>(.*?)</li>", findings.group(1), re.S):
        missing = _numbers(sentence) - tables
        assert not missing, f"{sorted(missing)} not in any table: {sentence}"
    assert _numbers(findings.group(1))  # the check reads something


def test_every_number_in_the_findings_is_in_a_table_of_the_page(full_report: Path) -> None:
    assert_findings_numbers_in_tables(full_report.read_text(encoding="utf-8"))
