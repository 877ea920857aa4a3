"""The viewer page in a real headless Chromium (Debian's chromium + chromium-driver, through
selenium; nothing is downloaded). Without them the test skips with the reason, except in CI
(``CI=true``), where it fails.

Saves ``test-artifacts/viewer.png`` and records the page's load time (navigation start to
feature list rendered) for 10,000 features in ``test-artifacts/viewer_page_load.json``.
"""

import contextlib
import json
import os
import shutil
import tempfile
import threading
from pathlib import Path

import pytest

from dictionary_learning.viewer import make_server
from dictionary_learning.viewer.synthetic import write_synthetic_run

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = os.environ.get("VIEWER_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("VIEWER_TEST_CHROMEDRIVER", "/usr/bin/chromedriver")
HTML_TOKENS = ["<script>window.__pwned=1</script>", "<b>bold</b>",
               '<img src=x onerror="window.__pwned=2">']
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1400,1000"]


def unavailable(reason: str):
    """Skip with ``reason``; in CI a missing browser is a failure, not a skip."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"browser test cannot run in CI: {reason}")
    pytest.skip(reason)


@contextlib.contextmanager
def headless_chromium():
    """A selenium driver for Debian's chromium, on a fresh profile; quit on exit."""
    os.environ.setdefault("SE_OFFLINE", "true")  # selenium's manager must not fetch anything
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        unavailable("selenium is not installed (pip install -e '.[test]')")
    for path in (CHROMIUM, CHROMEDRIVER):
        if not Path(path).exists():
            unavailable(f"{path} is missing (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    profile = tempfile.mkdtemp(prefix="viewer-chromium-")
    options.add_argument(f"--user-data-dir={profile}")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def wait(driver, condition, timeout=20):
    from selenium.webdriver.support.ui import WebDriverWait
    return WebDriverWait(driver, timeout).until(condition)


def ranked(run, metric):
    column = json.loads((run / "features.json").read_text())[metric]
    return sorted(range(len(column)), key=lambda i: (-column[i], i))


def shown_feature(driver, feature_id):
    """Wait until the detail pane shows ``feature_id`` with its histogram and contexts."""
    from selenium.webdriver.common.by import By

    def ready(d):
        detail = d.find_element(By.ID, "detail")
        return (detail.get_attribute("data-feature") == str(feature_id)
                and d.find_elements(By.CSS_SELECTOR, "#detail svg.hist rect.bar")
                and d.find_elements(By.CSS_SELECTOR, "#detail .contexts.top .context"))
    wait(driver, ready)


FIRST_ROW = """
    const list = document.getElementById('list');
    const rows = [...list.querySelectorAll('.row')].filter(r => r.offsetTop >= list.scrollTop);
    rows.sort((a, b) => a.offsetTop - b.offsetTop);
    return rows[0]"""  # the top visible row element


def first_row_id(driver):
    """The feature id in the list's top visible row (read in one script: the list re-renders
    its rows as it scrolls, so element handles can go stale between calls)."""
    return int(driver.execute_script(FIRST_ROW + ".dataset.id;"))


def test_viewer_page_in_headless_chromium(tmp_path):
    with headless_chromium() as browser:
        big_run = write_synthetic_run(tmp_path / "big", n_features=10_000, n_top=3,
                                      n_random=2, ctx_len=10, n_bins=16,
                                      extra_tokens=HTML_TOKENS, seed=5)
        server = make_server(big_run, "127.0.0.1", 0)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            drive(browser, server.url, big_run)
        finally:
            server.shutdown()
            server.server_close()


def drive(browser, url, big_run):
    """Load, click, switch metric, search; check what the page shows against the files."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    browser.get(url)
    wait(browser, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-list-ready"))
    load_ms = float(browser.find_element(By.TAG_NAME, "body").get_attribute("data-list-ready"))
    print(f"page load (navigation start to feature list rendered), 10k features: "
          f"{load_ms:.0f} ms")
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "viewer_page_load.json").write_text(json.dumps(
        {"n_features": 10_000, "list_ready_ms": round(load_ms, 1)}) + "\n")
    assert load_ms < 10_000  # loose: the spec's 1 s is reported, not asserted on shared CPUs

    # The list is ranked by the first metric and virtualised (a few dozen rows exist).
    order = ranked(big_run, "density")
    rows = browser.find_elements(By.CSS_SELECTOR, "#list .row")
    assert 10 < len(rows) < 200 and first_row_id(browser) == order[0]

    # Click a feature in the list: its statistics, histogram and contexts appear.
    browser.execute_script(FIRST_ROW + ";").click()
    shown_feature(browser, order[0])
    info = json.loads((big_run / "histograms.json").read_text())
    bars = browser.find_elements(By.CSS_SELECTOR, "#detail svg.hist rect.bar")
    assert len(bars) == len(info["counts"][order[0]])

    # Switch metric: the list is re-ranked by hand-sorted order, the selection kept.
    Select(browser.find_element(By.ID, "metric")).select_by_value("max_activation")
    by_max = ranked(big_run, "max_activation")
    wait(browser, lambda d: d.find_element(By.ID, "value-head").text == "max_activation")
    browser.execute_script("document.getElementById('list').scrollTop = 0")
    wait(browser, lambda d: first_row_id(d) == by_max[0])
    detail = browser.find_element(By.ID, "detail")
    assert detail.get_attribute("data-feature") == str(order[0])
    assert f"rank by max_activation {by_max.index(order[0]) + 1} of 10,000" in detail.text

    # Search by id: the feature whose contexts hold HTML.
    box = browser.find_element(By.ID, "search-id")
    box.clear()
    box.send_keys("0\n")
    shown_feature(browser, 0)
    check_tokens_are_text_and_heat_map(browser, big_run)

    ARTIFACTS.mkdir(exist_ok=True)
    assert browser.save_screenshot(str(ARTIFACTS / "viewer.png"))
    assert browser.execute_script("return document.getElementById('error').hidden")


def check_tokens_are_text_and_heat_map(browser, run):
    """HTML tokens are literal text and never ran; backgrounds follow act / feature max."""
    from selenium.webdriver.common.by import By

    texts = browser.execute_script(
        "return [...document.querySelector('#detail .contexts.top .context')"
        ".querySelectorAll('.tok')].map(t => t.textContent)")
    assert texts[:3] == HTML_TOKENS
    assert browser.execute_script("return typeof window.__pwned") == "undefined"
    for tag in ("b", "img", "script"):
        assert not browser.find_elements(By.CSS_SELECTOR, f"#detail {tag}"), tag
    assert not any("\n" in t or "\t" in t for t in browser.execute_script(
        "return [...document.querySelectorAll('#detail .tok')].map(t => t.textContent)"))

    # Heat-map: each token's background alpha = act / the feature's max activation.
    contexts = json.loads((run / "contexts.json").read_text())["top"]["0"]
    feature_max = json.loads((run / "features.json").read_text())["max_activation"][0]
    colours = browser.execute_script(
        "return [...document.querySelectorAll('#detail .contexts.top .context')]"
        ".map(c => [...c.querySelectorAll('.tok')].map(t => getComputedStyle(t).backgroundColor))")
    assert len(colours) == len(contexts)
    for ctx, row in zip(contexts, colours):
        for act, colour in zip(ctx["acts"], row):
            assert abs(alpha(colour) - min(1.0, act / feature_max)) < 5e-3, (act, colour)  # 8-bit alpha


def alpha(css_colour: str) -> float:
    """The alpha of a computed CSS colour: ``rgb(r, g, b)`` is 1, transparent is 0."""
    inside = css_colour[css_colour.index("(") + 1: -1].split(",")
    return float(inside[3]) if len(inside) == 4 else 1.0
