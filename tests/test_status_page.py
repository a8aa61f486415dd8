"""The status page in a real headless Chromium, during a short paced run of the whole daemon.

The page must show what the ledger holds: once the run has ingested and processed everything, the
page's numbers (cards, files table, chart legends) are compared with PostgreSQL, the charts must hold
drawn data, and a screenshot is saved to tests/artifacts/status-page.png for a person to look at.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from tests.pg_cluster import free_port

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "tests" / "artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
ROWS = 24_000
BATCH = 2_000

pytestmark = pytest.mark.slow


def _wait(what: str, check, deadline: float, every: float = 0.5):
    end = time.monotonic() + deadline
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {deadline:.0f}s waiting for {what}")
        time.sleep(every)


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="tp-chromium-")
    for arg in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--window-size=1400,1750",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def daemon(product_env, base_env, tmp_path):
    """`python main.py` on a generated sample plus one broken file, paced, with its HTTP endpoint on a free port."""
    inbox = Path(base_env["LOCAL_INBOX_DIR"])
    env = dict(product_env)
    port = free_port()
    env.update(
        {
            "CHUNK_INTERVAL_SECONDS": "0.5",
            "BATCH_SIZE": str(BATCH),
            "METRICS_ADDR": f"127.0.0.1:{port}",
            "LOG_FORMAT": "json",
            # thresholds low enough for a small sample to produce detections of every pattern
            "PATID1_MIN_MERCHANT_TXNS": "500",
            "PATID2_MIN_TXNS": "5",
            "PATID2_MAX_AVG_AMOUNT": "40",
            "PATID3_MIN_FEMALE_CUSTOMERS": "3",
        }
    )
    subprocess.run(
        [sys.executable, "-m", "src.sample_data", "--rows", str(ROWS), "--seed", "11", "--out", str(inbox)],
        env=env,
        cwd=str(ROOT),
        check=True,
        capture_output=True,
    )
    (inbox / "broken.csv").write_bytes(b"step,customer\x00,age\n1,2,3\n")
    log = open(tmp_path / "daemon.log", "wb")
    proc = subprocess.Popen([sys.executable, "main.py"], env=env, cwd=str(ROOT), stdout=log, stderr=log)
    try:
        yield proc, f"http://127.0.0.1:{port}/"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _ledger(conn) -> dict:
    with conn.cursor() as cur:
        cur.execute(
            "SELECT count(*) FILTER (WHERE status = 'written'), "
            "coalesce(sum(rows_valid) FILTER (WHERE status = 'written'), 0), "
            "coalesce(sum(rows_quarantined) FILTER (WHERE status = 'written'), 0), "
            "count(*) FILTER (WHERE processed_at IS NOT NULL), "
            "coalesce(sum(rows_valid) FILTER (WHERE processed_at IS NOT NULL), 0), "
            "count(*) FILTER (WHERE status = 'written' AND processed_at IS NULL) FROM chunks"
        )
        keys = ("chunks_written", "rows_ingested", "rows_quarantined", "chunks_processed", "rows_processed", "backlog")
        out = dict(zip(keys, cur.fetchone()))
        cur.execute("SELECT pattern_id, count(*) FROM pattern_detections GROUP BY 1")
        out["by_pattern"] = dict(cur.fetchall())
        out["detections"] = sum(out["by_pattern"].values())
        cur.execute("SELECT name, status, rows_ingested, rows_quarantined, chunks FROM source_files ORDER BY name")
        out["files"] = cur.fetchall()
        cur.execute("SELECT to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')")
        out["read_at"] = cur.fetchone()[0]
    return out


def _complete(conn) -> dict | None:
    """The ledger once the whole sample is ingested and processed (and stays so), else None."""
    ledger = _ledger(conn)
    statuses = {name: status for name, status, *_ in ledger["files"]}
    done = statuses.get("transactions.csv") == "done" and statuses.get("broken.csv") == "failed"
    if done and ledger["backlog"] == 0 and ledger["chunks_processed"] == ROWS // BATCH:
        return ledger
    return None


def _number(text: str) -> int:
    return int(text.replace(",", ""))


def test_status_page_shows_the_ledger_in_a_real_browser(daemon, browser, pg_conn):
    proc, url = daemon
    _wait("the daemon's status page", lambda: proc.poll() is not None or _http_ok(url), 240)
    assert proc.poll() is None, "the daemon exited before serving its page"

    browser.get(url)
    _wait("the page's first render", lambda: browser.execute_script("return document.body.dataset.loaded"), 60)
    # while the run is under way the page already shows its progress
    _wait(
        "a processed chunk on the page",
        lambda: _number(browser.find_element("css selector", '[data-k="chunks_processed"]').text.replace("-", "0")) > 0,
        300,
    )

    ledger = _wait("the run to ingest and process the whole sample", lambda: _complete(pg_conn), 400, every=1.0)
    _wait(
        "a page refresh after the ledger settled",
        lambda: (browser.execute_script("return document.body.dataset.loaded") or "") > ledger["read_at"],
        60,
    )

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(ARTIFACTS / "status-page.png"))

    def card(key: str) -> int:
        return _number(browser.find_element("css selector", f'[data-k="{key}"]').text)

    assert card("chunks_written") == ledger["chunks_written"] == ROWS // BATCH
    assert card("chunks_processed") == ledger["chunks_processed"]
    assert card("backlog_chunks") == 0
    assert card("rows_ingested") == ledger["rows_ingested"] == ROWS
    assert card("rows_quarantined") == ledger["rows_quarantined"]
    assert card("detections") == ledger["detections"] > 0
    p50 = browser.find_element("css selector", '[data-k="p50"]').text
    assert re.fullmatch(r"\d+(\.\d+)? s", p50), p50

    rows = browser.find_elements("css selector", "#files tbody tr")
    shown = sorted(
        (c[0], c[2], _number(c[3]), _number(c[4]), _number(c[5]))
        for c in ([td.text for td in r.find_elements("tag name", "td")] for r in rows)
    )
    assert shown == sorted(ledger["files"])

    # charts: drawn paths with data, and their legends add up to the ledger's last hour
    for chart in ("throughput", "backlog", "detections"):
        paths = browser.find_elements("css selector", f"#chart-{chart} path.series")
        assert paths and all(p.get_attribute("d").startswith("M") for p in paths), chart
    throughput = browser.find_element("id", "legend-throughput").text
    assert f"ingested (X) ({ledger['rows_ingested']:,})" in throughput
    assert f"processed (Y) ({ledger['rows_processed']:,})" in throughput
    heights = browser.execute_script(
        "return [...document.querySelectorAll('#chart-throughput path.series')].map(p => p.getBBox().height)"
    )
    assert all(h > 0 for h in heights), heights  # not flat lines: the run's minutes hold rows
    detections = browser.find_element("id", "legend-detections").text
    for pattern, n in ledger["by_pattern"].items():
        assert re.search(rf"{pattern}: [\d,]+ this hour, {n:,} in all", detections), detections

    # the broken file is named as a problem (with the ERROR it logged), and that ERROR is among the last failures
    assert browser.find_element("id", "health").text == "2 problem(s)"
    problems = browser.find_element("id", "problems").text.splitlines()
    assert problems[0].startswith("file broken.csv is failed: binary content (NUL bytes)")
    assert problems[1] == "1 ERROR line(s) in processing_logs in the last 15 minutes"
    assert "file_failed" in browser.find_element("id", "failures").text
    last = browser.find_elements("css selector", "#detections tbody tr")
    assert len(last) == min(20, ledger["detections"])

    # who works: this daemon's Y leads (the holder the leaders table names), no X holds a lease once the file is done
    with pg_conn.cursor() as cur:
        cur.execute("SELECT holder, term FROM leaders WHERE role = 'mechanism_y'")
        holder, term = cur.fetchone()
    who = [
        [td.text for td in r.find_elements("tag name", "td")]
        for r in browser.find_elements("css selector", "#leadership tbody tr")
    ]
    assert who[0][:2] == ["Y leader", holder] and who[0][2].startswith(f"term {term} since "), who
    assert who[1:] == [["lease takeovers", "0", "files taken from an X that stopped renewing"]], who
