"""The report's sample explorer: its data (bounded, escaped) and, in headless Chromium, that sorting,
filtering and opening a sample work on a real report written by ``run_selection``."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import REPO, fake_record, fake_shard, select_config, write_router_dataset
from test_selection_report import byte_tokenizer

from quality_gate.data import encode
from quality_gate.selection import explorer, run_selection

SCREENSHOT = REPO / "docs" / "img" / "report_explorer.png"
DATA_RE = re.compile(r"<script type='application/json' id='qx-data'>(.*?)</script>", re.S)
WORDS = ["apple", "river", "stone", "cloud", "ember", "maple", "orbit", "pixel", "quartz", "tulip"]


def make_run(root: Path, n_alpha: int = 30, n_beta: int = 20) -> Path:
    """A Stage 2 run dir whose fingerprint points at a byte-level tokenizer (so heat-maps render), with
    embeddings, corruption labels, and record text that is HTML."""
    tok = byte_tokenizer(root / "tok")
    fields = {"selector_model_path": str(root / "tok"), "max_sequence_length": 512, "truncation": "right"}
    g = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)
    for name, n in (("alpha", n_alpha), ("beta", n_beta)):
        records = []
        for i in range(n):
            r = fake_record(name, f"{name}_{i}", {"corruption": "shuffle" if i % 4 == 0 else "none"})
            r["messages"][1]["content"] = f"The {WORDS[i % 10]} answer number {i} of {name}."
            records.append(r)
        if name == "alpha":
            records[3]["messages"][1]["content"] = "<b>bold & risky</b></script><script>alert(1)</script>"
            records[5]["messages"][1]["content"] = "A long answer. " * 40
        lengths = [len(encode.encode_record(r, tok, 512, "right").input_ids) - 1 for r in records]
        emb = rng.normal(size=(n, 8)).astype(np.float16)
        shard = fake_shard([r["id"] for r in records], lengths, 3, g, embeddings=emb)
        write_router_dataset(root / "router_data", name, [shard], fingerprint_fields=fields, records=records)
    return root


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    root = make_run(tmp_path_factory.mktemp("explorer"))
    patch = pytest.MonkeyPatch()
    patch.setattr(explorer, "HEATMAPS", 10)  # 5 best + 5 worst rows get heat-maps, the rest plain text
    try:
        run_selection(
            select_config(
                root_dir=str(root),
                diversity="cluster",
                diversity_clusters=3,
                selection_percentage=0.3,
                report_top_k=2,
            )
        )
    finally:
        patch.undo()
    return root / "selection_quality_gate_cluster" / "selection_report.html"


def _doc(path: Path) -> dict:
    return json.loads(DATA_RE.search(path.read_text()).group(1))


def test_explorer_data_columns_escaping_and_bounds(report):
    text = report.read_text()
    doc = _doc(report)
    keys = [c["key"] for c in doc["columns"]]
    assert keys[:3] == ["id", "dataset", "q"]
    assert {
        "rank_quality_gate",
        "rank_perplexity",
        "rank_random",
        "cluster",
        "corruption",
        "length",
        "kept",
    } <= set(keys)
    assert len(doc["rows"]) == 50 and len(doc["text"]) == 50
    # best first by the run's selector; ranks are 1-based
    q = [r[keys.index("q")] for r in doc["rows"]]
    assert q == sorted(q, reverse=True) and doc["rows"][0][keys.index("rank_quality_gate")] == 1
    assert sum(r[keys.index("kept")] == "kept" for r in doc["rows"]) == 15
    assert {r[keys.index("cluster")] for r in doc["rows"]} == {0, 1, 2}
    # heat-maps for the 5 best and 5 worst rows; token pieces of the byte tokenizer
    assert sorted(map(int, doc["heat"])) == [0, 1, 2, 3, 4, 45, 46, 47, 48, 49]
    first = doc["heat"]["0"]
    assert len(first["t"]) == len(first["g"]) == len(first["p"]) and first["p"][0] is None
    # A record's markup never ends the data element or becomes markup of the page.
    assert text.count("<script") == 2 == text.count("</script>")  # the data element and the script
    assert "<b>bold" not in text
    cut = doc["cut"][[r[0] for r in doc["rows"]].index("alpha_5")]
    assert cut > explorer.TEXT_CHARS
    assert re.search(r"Data: [\d,]+ bytes, [\d,]+ bytes per sample", text)
    assert "All 50 samples" in text


def test_explorer_rows_are_bounded(tmp_path, monkeypatch):
    root = make_run(tmp_path, n_alpha=12, n_beta=8)
    monkeypatch.setattr(explorer, "MAX_ROWS", 10)
    monkeypatch.setattr(explorer, "EDGE_ROWS", 3)
    res = run_selection(select_config(root_dir=str(root), selection_percentage=0.3))
    doc = _doc(root / "selection_report.html")
    score = res.q
    ids = [r[0] for r in doc["rows"]]
    order = sorted(range(20), key=lambda i: (-score[i], res.stats.ids[i]))
    assert ids == [res.stats.ids[i] for i in order[:3] + order[-3:]]
    assert "The 3 best and 3 worst of the 20 samples" in (root / "selection_report.html").read_text()


# --------------------------------------------------------------------------------------------- #
# Headless Chromium
# --------------------------------------------------------------------------------------------- #
def _browser():
    """A headless Chromium driven by selenium through the system chromedriver, or a skip reason."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("chromium / chromedriver not installed (make browser installs them with apt-get)")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium not installed (pip install -e '.[dev]')")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    profile = tempfile.mkdtemp(prefix="qg-chromium-")
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--window-size=1280,1000",
    ):
        opts.add_argument(flag)
    return webdriver.Chrome(service=Service(driver), options=opts), profile


@pytest.mark.slow
def test_explorer_in_headless_chromium(report, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser, profile = _browser()
    try:
        browser.get(report.as_uri())
        wait = WebDriverWait(browser, 20)
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#qx-table tbody tr"))

        def column(key: str) -> list[str]:
            return [
                td.get_attribute("data-v") or ""
                for td in browser.find_elements(By.CSS_SELECTOR, f"#qx-table tbody td[data-key='{key}']")
            ]

        def click(element) -> None:  # the row under the sticky header would not take the click
            browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", element)
            element.click()

        def ids() -> list[str]:
            return column("id")

        before = [float(v) for v in column("q")]
        assert len(before) == 50 and before == sorted(before, reverse=True)
        # Sort by q: ascending, then reversed.
        browser.find_element(By.CSS_SELECTOR, "#qx-table th[data-key='q']").click()
        after = [float(v) for v in column("q")]
        assert after == sorted(before) and after != before
        browser.find_element(By.CSS_SELECTOR, "#qx-table th[data-key='q']").click()
        assert [float(v) for v in column("q")] == sorted(before, reverse=True)
        # Sort by dataset (a string column).
        browser.find_element(By.CSS_SELECTOR, "#qx-table th[data-key='dataset']").click()
        ds = column("dataset")
        assert ds == sorted(ds) and ds[0] == "alpha" and ds[-1] == "beta"

        # Filter: text box (ids, datasets and text), then the dataset and kept selects.
        box = browser.find_element(By.ID, "qx-filter")
        box.send_keys("quartz")  # in the answers of samples 8, 18, 28 of each dataset
        assert sorted(ids()) == sorted(["alpha_8", "alpha_18", "alpha_28", "beta_8", "beta_18"])
        assert "5 matching" in browser.find_element(By.ID, "qx-count").text
        box.clear()
        box.send_keys("beta_1")
        assert sorted(ids()) == sorted(["beta_1", *[f"beta_1{i}" for i in range(10)]])
        box.clear()
        box.send_keys("x")  # clear() fires no input event: a key does
        box.send_keys("\b")
        assert len(ids()) == 50
        from selenium.webdriver.support.ui import Select

        Select(browser.find_element(By.ID, "qx-dataset")).select_by_value("beta")
        Select(browser.find_element(By.ID, "qx-kept")).select_by_value("kept")
        kept_beta = ids()
        assert kept_beta and all(i.startswith("beta_") for i in kept_beta)
        assert set(column("kept")) == {"kept"}
        Select(browser.find_element(By.ID, "qx-dataset")).select_by_value("")
        Select(browser.find_element(By.ID, "qx-kept")).select_by_value("")

        # Open the sample whose text is markup: shown as text, never parsed.
        sample = browser.find_element(By.ID, "qx-sample")
        assert not sample.is_displayed()
        box.send_keys("alpha_3")
        browser.find_element(By.CSS_SELECTOR, "#qx-table tbody tr[data-row]").click()
        wait.until(lambda b: sample.is_displayed())
        assert sample.find_element(By.TAG_NAME, "h3").text == "alpha_3"
        assert "<b>bold & risky</b></script><script>alert(1)</script>" in sample.text
        assert not sample.find_elements(By.TAG_NAME, "b") and not sample.find_elements(By.TAG_NAME, "script")

        # Best first again; a middle row has no heat-map (plain text), the best one has.
        box.clear()
        box.send_keys("x")
        box.send_keys("\b")
        browser.find_element(By.CSS_SELECTOR, "#qx-table th[data-key='q']").click()
        browser.find_element(By.CSS_SELECTOR, "#qx-table th[data-key='q']").click()  # descending
        rows = browser.find_elements(By.CSS_SELECTOR, "#qx-table tbody tr")
        middle = rows[25].find_element(By.CSS_SELECTOR, "td[data-key='id']").text
        click(rows[25])
        wait.until(lambda b: sample.find_element(By.TAG_NAME, "h3").text == middle)
        assert "precomputed for the 5 best and 5 worst rows only" in sample.text
        assert f"Question {middle}?" in sample.find_element(By.CSS_SELECTOR, ".qx-text").text
        assert not sample.find_elements(By.CSS_SELECTOR, ".tokens span")
        best = rows[0].find_element(By.CSS_SELECTOR, "td[data-key='id']").text
        click(rows[0])
        wait.until(lambda b: sample.find_element(By.TAG_NAME, "h3").text == best)
        assert "coloured by gate" in sample.text and "coloured by perplexity" in sample.text
        spans = sample.find_elements(By.CSS_SELECTOR, ".tokens span")
        assert len(spans) > 20 and spans[1].get_attribute("title").startswith("token 1: gate ")
        assert "rgba(31, 119, 180" in spans[1].get_attribute("style")
        assert f"Question {best}?" in sample.text
        assert rows[0].get_attribute("class") == "sel"
        severe = [e for e in browser.get_log("browser") if e.get("level") == "SEVERE"]
        assert not severe, severe

        # The look: the explorer at 1280 px with a sample open.
        browser.execute_script("document.getElementById('explorer').scrollIntoView()")
        shot = tmp_path / "report_explorer.png"
        assert browser.save_screenshot(str(shot))
        png = shot.read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and int.from_bytes(png[16:20], "big") == 1280
        if os.environ.get("QG_UPDATE_SCREENSHOT"):
            SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(shot, SCREENSHOT)
    finally:
        browser.quit()
        shutil.rmtree(profile, ignore_errors=True)
