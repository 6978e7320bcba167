"""The report in a real browser (headless Chromium): it renders, lists every series, filters and sorts.

The HTML tests read the file as text; this one runs its inline script the way a forecaster's
browser does. Chromium and its driver come from Debian (scripts/install-test-deps.sh); without
them the test is skipped and says why.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from report_fixture import fill_forecaster_store
from shared.results.report import write_report
from shared.results.result_store import SQLiteStore

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
N_SERIES = 40


def _missing() -> str | None:
    for tool in (CHROMIUM, CHROMEDRIVER):
        if not (tool.exists() and os.access(tool, os.X_OK)):
            return f"{tool} not installed (scripts/install-test-deps.sh installs chromium and chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium not installed (pip install -r requirements-dev.txt)"
    return None


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    reason = _missing()
    if reason:
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tmp_path_factory.mktemp("chromium-profile")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def page(browser, tmp_path_factory):
    """The report of a 40-series store, open in the browser; returns what the store holds."""
    root = tmp_path_factory.mktemp("report")
    with SQLiteStore(root / "results.sqlite") as store:
        expected = fill_forecaster_store(store, n=N_SERIES)
        path = write_report(store, root / "report.html")
    browser.get(path.resolve().as_uri())
    return expected


def visible_items(browser) -> list[str]:
    """The item key of every series row the page shows, top to bottom (the second key column)."""
    return browser.execute_script(
        "return Array.from(document.querySelectorAll('#series tbody tr'))"
        ".filter(r => !r.hidden && r.offsetParent !== null).map(r => r.cells[1].textContent);")


def wapes(browser) -> list[float | None]:
    return browser.execute_script(
        "const col = Array.from(document.querySelectorAll('#series thead th')).findIndex(h => h.textContent.trim()"
        ".startsWith('WAPE'));"
        "return Array.from(document.querySelectorAll('#series tbody tr')).filter(r => !r.hidden)"
        ".map(r => r.cells[col].dataset.v === '' ? null : parseFloat(r.cells[col].dataset.v));")


def header(browser, label: str):
    from selenium.webdriver.common.by import By

    for th in browser.find_elements(By.CSS_SELECTOR, "#series thead th"):
        if th.text.strip().rstrip("▲▼ ").strip() == label:
            return th
    raise AssertionError(f"no header {label!r}")


def test_the_page_renders_with_every_series(browser, page):
    assert browser.title.startswith("manymodels")
    assert browser.execute_script("return document.querySelectorAll('svg').length") >= 3  # charts drawn
    assert sorted(visible_items(browser)) == sorted(page.items.values())
    assert browser.find_element("id", "series-count").text == f"{N_SERIES} of {N_SERIES} series"


def test_typing_in_the_filter_narrows_the_rows_to_the_matching_series(browser, page):
    from selenium.webdriver.common.by import By

    box = browser.find_element(By.ID, "series-filter")
    box.clear()
    box.send_keys("i01")
    assert sorted(visible_items(browser)) == [f"i01{d}" for d in range(10)]
    assert browser.find_element(By.ID, "series-count").text == f"10 of {N_SERIES} series"
    box.send_keys(" s3")  # every word must match: store S3 among i010..i019
    assert sorted(visible_items(browser)) == ["i011", "i015", "i019"]
    box.clear()
    box.send_keys(" ")  # clear() sends no input event; a keystroke does
    assert len(visible_items(browser)) == N_SERIES


def test_the_source_picker_shows_only_the_series_a_source_serves(browser, page):
    from selenium.webdriver.support.ui import Select

    picker = Select(browser.find_element("id", "series-source"))
    picker.select_by_value("global")
    assert sorted(visible_items(browser)) == sorted(page.items[p] for p, s in page.source.items() if s == "global")
    picker.select_by_value("")
    assert len(visible_items(browser)) == N_SERIES


def test_clicking_a_header_sorts_and_wape_sorts_worst_first(browser, page):
    header(browser, "item").click()
    assert visible_items(browser) == sorted(page.items.values())
    header(browser, "WAPE").click()
    values = wapes(browser)
    known = [v for v in values if v is not None]
    assert known == sorted(known, reverse=True) and known[0] == max(page.wape.values())
    assert values[len(known):] == [None] * (len(values) - len(known))  # series without a WAPE last
    header(browser, "WAPE").click()  # again: best first, still the empty ones last
    known = [v for v in wapes(browser) if v is not None]
    assert known == sorted(known)


def test_a_long_table_lays_out_its_first_rows_and_finds_any_other_by_filter_or_sort(
        browser, tmp_path_factory, monkeypatch):
    """10,000 table rows took 15-20 s to open; only the first SHOWN_ROWS are laid out, the rest wait in
    a template: the count says so, a filter finds a series from the rest, a sort brings them forward."""
    from selenium.webdriver.common.by import By

    from shared.results import report_table

    monkeypatch.setattr(report_table, "SHOWN_ROWS", 10)
    root = tmp_path_factory.mktemp("long-report")
    with SQLiteStore(root / "results.sqlite") as store:
        expected = fill_forecaster_store(store, n=N_SERIES)
        path = write_report(store, root / "report.html")
    browser.get(path.resolve().as_uri())
    assert len(visible_items(browser)) == 10
    assert browser.find_element(By.ID, "series-count").text == \
        f"{N_SERIES} of {N_SERIES} series (the first 10 shown: filter or sort to see others)"
    shown = set(visible_items(browser))
    hidden = sorted(set(expected.items.values()) - shown)
    box = browser.find_element(By.ID, "series-filter")
    box.send_keys(hidden[-1])
    assert visible_items(browser) == [hidden[-1]]
    box.clear()
    box.send_keys(" ")
    header(browser, "item").click()
    assert visible_items(browser) == sorted(expected.items.values())[:10]  # the first ten of all, not of the shown
