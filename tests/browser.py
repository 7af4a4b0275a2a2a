"""Open a report.html in a real headless Chromium (Debian's chromium + chromium-driver)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"

# What the page itself reports once loaded: the table, each chart's drawn size and shapes,
# and every resource the browser fetched (a self-contained page fetches none).
_PROBE = """
const charts = [...document.querySelectorAll('figure.chart')].map(f => {
  const svg = f.querySelector('svg');
  const box = svg ? svg.getBoundingClientRect() : {width: 0, height: 0};
  return {id: f.id, width: box.width, height: box.height,
          shapes: svg ? svg.querySelectorAll('path, use, rect').length : 0};
});
return {
  title: document.title,
  headers: [...document.querySelectorAll('#comparison th')].map(th => th.textContent),
  rows: [...document.querySelectorAll('#comparison tbody tr')].map(
      tr => [...tr.children].map(td => td.textContent)),
  diagnosis: document.querySelector('#diagnosis')?.className,
  charts: charts,
  fetched: performance.getEntriesByType('resource').map(r => r.name),
};
"""


def open_report(html_path: Path, tmp_path: Path, screenshot: Path | None = None) -> dict[str, Any]:
    """Load ``html_path`` in headless Chromium and return what `_PROBE` finds on the page.

    Skips when no browser is installed, unless COMPRESSOR_REQUIRE_BROWSER=1 (CI sets it).
    """
    try:
        from selenium import webdriver
    except ImportError:
        _missing("selenium is not installed")
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        _missing("chromium and chromium-driver are not installed (apt-get install ...)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1280,2000",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(
        options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER)
    )
    try:
        driver.get(html_path.resolve().as_uri())
        found = driver.execute_script(_PROBE)
        if screenshot is not None:
            driver.save_screenshot(str(screenshot))
    finally:
        driver.quit()
    return found


def _missing(why: str) -> None:
    if os.environ.get("COMPRESSOR_REQUIRE_BROWSER") == "1":
        pytest.fail(f"browser test required but {why}")
    pytest.skip(why)


def assert_report_renders(html_path: Path, tmp_path: Path, rows: int) -> dict[str, Any]:
    """The table has ``rows`` rows and both charts are drawn, with nothing fetched."""
    page = open_report(html_path, tmp_path, screenshot=tmp_path / "report.png")
    assert page["title"] == "compressor report"
    assert len(page["rows"]) == rows
    assert page["headers"][:4] == ["stage", "runtime", "precision", "accuracy"]
    assert {c["id"] for c in page["charts"]} == {"accuracy-latency", "per-stage"}
    for chart in page["charts"]:
        assert chart["width"] > 300 and chart["height"] > 150, chart
        assert chart["shapes"] > 20, chart  # axes, ticks, points or bars were drawn
    assert page["fetched"] == []
    return page
