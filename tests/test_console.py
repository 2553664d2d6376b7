"""The web console at ``/`` in a real browser: headless Chromium driven by selenium through chromedriver.

Chromium and chromedriver come from Debian (``apt-get install chromium chromium-driver``; ``.ci/run``
installs them when it runs as root); nothing downloads a browser. Without them the browser tests
fail in CI (``CI=true``) and are skipped elsewhere, with the reason.

Artifacts: ``artifacts/console.png`` (a screenshot after a real cat photo went through the real
default model). ``RINGSERVE_UPDATE_DOCS=1`` also writes the README's ``frontend/static/console.png``.
"""

from __future__ import annotations

import io
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from frontend.console_stats import History, Snapshot, quantile, snapshot_of
from frontend.routes.console import page, summarise
from tests.harness import ROOT, Appliance, wait_for
from tests.models import expected_box, write_pixel_detector
from tests.photos import photo

MODEL = "ssd-mobilenet-v2-coco"
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ARTIFACTS = ROOT / "artifacts"
DOCS_SCREENSHOT = ROOT / "frontend" / "static" / "console.png"
KEY = "console-test-key"
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,1000",
    "--hide-scrollbars",
    # a synthetic camera for the webcam mode, allowed without a prompt
    "--use-fake-device-for-media-stream",
    "--use-fake-ui-for-media-stream",
)


# ------------------------------------------------------------------ the numbers, without a browser
def test_quantile_is_prometheus_histogram_quantile() -> None:
    buckets = {0.01: 0.0, 0.05: 50.0, 0.1: 90.0, 0.5: 100.0, float("inf"): 100.0}
    assert quantile(0.5, buckets) == pytest.approx(0.01 + 0.04 * (50 / 50))
    assert quantile(0.99, buckets) == pytest.approx(0.1 + 0.4 * (9 / 10))
    assert quantile(0.99, {0.1: 0.0, float("inf"): 0.0}) is None
    assert quantile(0.99, {0.1: 1.0, float("inf"): 10.0}) == 0.1  # in +Inf: the highest finite bound


def test_summary_counts_inference_routes_over_the_window() -> None:
    def snap(at: float, predict: float, health: float, images: float, batches: float) -> Snapshot:
        return snapshot_of(
            [
                (
                    "ringserve_http_requests_total",
                    {"route": "/api/v1/predict", "method": "POST", "status": "200"},
                    predict,
                ),
                ("ringserve_http_requests_total", {"route": "/health", "method": "GET", "status": "200"}, health),
                ("ringserve_http_requests_total", {"route": "/api/v1/stats", "method": "GET", "status": "200"}, health),
                ("ringserve_http_request_duration_seconds_bucket", {"route": "/api/v1/predict", "le": "0.05"}, predict),
                ("ringserve_http_request_duration_seconds_bucket", {"route": "/api/v1/predict", "le": "+Inf"}, predict),
                ("ringserve_http_request_duration_seconds_bucket", {"route": "/health", "le": "+Inf"}, health),
                ("ringserve_inference_images_total", {"model": "m", "version": "1"}, images),
                ("ringserve_batch_size_sum", {"model": "m", "version": "1"}, images),
                ("ringserve_batch_size_count", {"model": "m", "version": "1"}, batches),
                ("ringserve_queue_depth", {"model": "m", "version": "1"}, 3.0),
                ("ringserve_ring_slots_in_use", {"pid": "11"}, 2.0),
                ("ringserve_ring_slots", {"pid": "11"}, 32.0),
                ("ringserve_errors_total", {"reason": "bad_input"}, 1.0),
            ],
            at,
        )

    history = History(window_s=10)
    first = snap(100.0, predict=10, health=50, images=10, batches=10)
    assert history.add(first) is None
    out = summarise(first, None)
    assert out["requests_per_s"] is None and out["requests_total"] == 10 and out["batch_size_total"] == 1.0
    assert out["queue_depth"] == 3 and out["errors_total"] == 1
    assert [(w.pid, w.in_use, w.slots) for w in out["workers"]] == [(11, 2, 32)]  # type: ignore[attr-defined]

    later = snap(104.0, predict=30, health=90, images=50, batches=20)
    out = summarise(later, history.add(later))
    assert out["window_s"] == 4.0
    assert out["requests_per_s"] == 5.0  # health and stats polls are not inference requests
    assert out["images_per_s"] == 10.0
    assert out["batch_size"] == 4.0  # 40 images in 10 batches
    assert out["p99_ms"] == pytest.approx(49.5)  # in the 0-50 ms bucket
    # the baseline is the newest read at least a window old (the oldest one while there is none)
    assert history.add(snap(108.0, 30, 90, 50, 20)) is first
    assert history.add(snap(111.0, 30, 90, 50, 20)) is first
    assert history.add(snap(115.0, 30, 90, 50, 20)) is later
    assert history.add(snap(130.0, 30, 90, 50, 20)).at == 115.0  # the newest read before the quiet spell
    assert summarise(snap(130.5, 30, 90, 50, 20), history.add(snap(130.5, 30, 90, 50, 20)))["p99_ms"] is None


def test_the_page_is_self_contained() -> None:
    html, csp = page()
    assert "<script>// ringserve console" in html and "<style>/* ringserve console" in html
    assert 'src="static/' not in html and 'href="static/' not in html
    assert re.search(r"https?://", html.replace("http://www.w3.org", "")) is None, "no CDN, no external URL"
    assert "script-src 'sha256-" in csp and "unsafe-inline" not in csp


# ------------------------------------------------------------------ the browser
def _browser_missing() -> str | None:
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.is_file()]
    if missing:
        return (
            f"{' and '.join(missing)} missing: install Debian's browser with `apt-get update && apt-get install "
            "-y chromium chromium-driver` (.ci/run does it when run as root)"
        )
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed: pip install -e '.[dev]'"
    return None


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    why = _browser_missing()
    if why:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"the console's browser tests cannot run in CI: {why}", pytrace=False)
        pytest.skip(why)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    log = tmp_path_factory.mktemp("chromedriver") / "chromedriver.log"
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER), log_output=str(log)), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def appliance() -> Iterator[Appliance]:
    repo = ROOT / "models"
    if not (repo / MODEL / "1" / "model.onnx").is_file():
        from engine.convert import pull_default  # cached by sha256: seconds when already converted

        pull_default(repo, progress=False)
    with Appliance(repo, workers=2, default_model=MODEL) as app:
        yield app


def errors_in(driver: Any, allow: str | None = None) -> list[str]:
    """SEVERE lines of the browser's console since the last call (uncaught errors, failed loads)."""
    lines = [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    return [m for m in lines if not (allow and re.search(allow, m))]


def until(driver: Any, script: str, timeout: float, what: str) -> Any:
    """Wait until ``script`` (a JS expression) is truthy in the page, and return its value."""
    found: list[Any] = []

    def check() -> bool:
        found[:] = [driver.execute_script(f"return ({script});")]
        return bool(found[0])

    try:
        wait_for(check, timeout, what, every=0.1)
    except AssertionError as exc:
        page_log = "\n".join(f"{e['level']} {e['message']}" for e in driver.get_log("browser"))
        raise AssertionError(f"{exc}\nbrowser console:\n{page_log or '(empty)'}") from None
    return found[0]


def open_console(driver: Any, url: str) -> None:
    # The page of an earlier test may still poll an appliance that has stopped: unload it first
    # (its requests are cancelled), then start from a clean console log.
    driver.get("about:blank")
    driver.get_log("browser")
    driver.get(f"{url}/")
    until(driver, "document.body.dataset.ready === 'true'", 20, "the console to start")


def number(driver: Any, element_id: str) -> float | None:
    text = driver.find_element("id", element_id).text
    match = re.match(r"^\s*(\d+(?:\.\d+)?)", text)
    return float(match.group(1)) if match else None


def test_a_cat_photo_is_drawn_with_its_box_and_the_panel_counts(browser: Any, appliance: Appliance) -> None:
    open_console(browser, appliance.url)
    until(browser, f"document.getElementById('model').value === '{MODEL}'", 20, "the default model in the picker")
    browser.find_element("id", "file").send_keys(str(photo("cat")))
    until(browser, "document.querySelector('#detections li[data-label=\"cat\"]')", 30, "a cat in the result list")

    # The canvas holds the photo and the cat's box, in the cat's colour, where the API put it.
    probe = browser.execute_script("""
        const c = document.getElementById('canvas'), li = document.querySelector('#detections li[data-label="cat"]');
        const [x1, y1, x2, y2] = JSON.parse(li.dataset.bbox), s = +c.dataset.scale, line = +c.dataset.line;
        const at = (x, y) => Array.from(c.getContext('2d').getImageData(Math.floor(x), Math.floor(y), 1, 1).data);
        return {boxes: +c.dataset.boxes, width: c.width, edge: at(x1 * s + line / 2, (y1 + y2) / 2 * s),
                inside: at((x1 + x2) / 2 * s, (y1 + y2) / 2 * s),
                swatch: getComputedStyle(li.querySelector('.swatch')).backgroundColor,
                label: document.getElementById('canvas').getAttribute('aria-label')};
    """)
    with Image.open(photo("cat")) as cat:
        assert probe["boxes"] >= 1 and probe["width"] == cat.width
    swatch = [int(v) for v in re.findall(r"\d+", probe["swatch"])[:3]]
    assert probe["edge"][:3] == swatch, probe  # the box's left side
    assert probe["inside"][3] == 255 and probe["inside"][:3] != swatch, probe  # the photo under it
    assert "cat" in probe["label"]
    timings = browser.find_element("id", "timings").text
    assert "Inference" in timings and "Round trip" in timings and MODEL in timings

    # Some traffic besides the page's own: the panel shows rates, p99, batch size, queue and rings.
    data = photo("cat").read_bytes()
    for _ in range(6):
        r = httpx.post(f"{appliance.url}/api/v1/predict", content=data, headers={"content-type": "image/jpeg"})
        assert r.status_code == 200, r.text
    until(
        browser,
        "(+document.getElementById('stat-total').textContent.split(' ')[0]) >= 7",
        15,
        "the panel to count 7 requests",
    )
    until(browser, "parseFloat(document.getElementById('stat-rps').textContent) > 0", 15, "requests/s above 0")
    assert (number(browser, "stat-ips") or 0) > 0
    assert browser.find_element("id", "stat-p99").text.endswith("ms")
    assert (number(browser, "stat-batch") or 0) >= 1
    assert number(browser, "stat-queue") == 0
    assert "ssd-mobilenet-v2-coco/1" in browser.find_element("id", "stat-models").text
    assert re.match(r"^(CPU|CUDA)", browser.find_element("id", "stat-providers").text)
    assert browser.find_element("id", "engine-badge").text == "engine: ready"
    rings = browser.find_elements("css selector", "#stat-rings li")
    assert sorted(int(li.get_attribute("data-pid")) for li in rings) == sorted(appliance.worker_pids())
    assert all(re.search(r"\d+/32$", li.text) for li in rings)

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "console.png"
    assert browser.save_screenshot(str(shot))
    if os.environ.get("RINGSERVE_UPDATE_DOCS") == "1":
        _write_docs_screenshot(shot)

    # Keyboard: the slider moves with the arrow keys and each change asks again with the new threshold.
    from selenium.webdriver.common.keys import Keys

    slider = browser.find_element("id", "confidence")
    rid = browser.find_element("id", "drop").get_attribute("data-request-id")
    slider.send_keys(Keys.END)
    until(browser, f"document.getElementById('drop').dataset.requestId !== '{rid}'", 20, "a new request at 0.95")
    assert browser.find_element("id", "confidence-value").text == "0.95"
    confidences = [float(c.text.rstrip("%")) for c in browser.find_elements("css selector", "#detections .conf")]
    assert all(c >= 95 for c in confidences), confidences
    assert errors_in(browser) == []


def test_webcam_frames_go_through_the_stream(browser: Any, appliance: Appliance) -> None:
    open_console(browser, appliance.url)
    streams = httpx.get(f"{appliance.url}/api/v1/stats").json()["features"]["stream"]
    button = browser.find_element("id", "webcam")
    if not streams:
        assert not button.is_displayed(), "no /ws/stream route: the webcam mode stays hidden"
        return
    until(browser, "!document.getElementById('webcam').hidden", 10, "the webcam button")
    button.click()  # Chromium's fake camera
    until(browser, "+document.getElementById('fps').dataset.answered >= 5", 30, "5 webcam frames answered")
    assert float(browser.find_element("id", "fps").get_attribute("data-fps")) > 0
    assert browser.find_element("id", "webcam").get_attribute("aria-pressed") == "true"
    button.click()
    until(browser, "document.getElementById('webcam').getAttribute('aria-pressed') === 'false'", 5, "the stop")
    assert errors_in(browser) == []


def test_the_api_key_is_asked_for_kept_and_sent(browser: Any, tmp_path: Path) -> None:
    from selenium.webdriver.common.keys import Keys

    write_pixel_detector(tmp_path / "repo")
    with Appliance(tmp_path / "repo", workers=1, env={"RINGSERVE_API_KEY": KEY}) as app:
        open_console(browser, app.url)
        until(browser, "document.getElementById('key-dialog').open", 10, "the API key dialog after a 401")
        # Escape cancels; the status polling goes on without opening the dialog again; the button opens it.
        browser.switch_to.active_element.send_keys(Keys.ESCAPE)
        until(browser, "+document.getElementById('stat-updated').dataset.failures >= 2", 10, "a poll after cancel")
        assert not browser.execute_script("return document.getElementById('key-dialog').open")
        assert "unauthorized" in browser.find_element("id", "stat-updated").text
        browser.find_element("id", "key-button").click()
        until(browser, "document.getElementById('key-dialog').open", 5, "the dialog from the API key button")
        browser.switch_to.active_element.send_keys(KEY, Keys.ENTER)  # the key field has the focus
        until(browser, "document.getElementById('model').value === 'pixels'", 15, "the models, with the key")
        assert browser.execute_script("return sessionStorage.getItem('ringserve.apiKey')") == KEY
        # A browser cannot send the key on a WebSocket: no webcam button (a note says why, with /ws/stream)
        stats = httpx.get(f"{app.url}/api/v1/stats", headers={"X-API-Key": KEY}).json()
        if stats["features"]["stream"]:
            until(browser, "!document.getElementById('webcam-note').hidden", 10, "the webcam note")
        assert not browser.find_element("id", "webcam").is_displayed()

        rgb, size = (200, 40, 120), (160, 120)
        image = tmp_path / "flat.png"
        Image.new("RGB", size, rgb).save(image)
        browser.find_element("id", "file").send_keys(str(image))
        until(browser, "document.querySelector('#detections li[data-label=\"thing\"]')", 15, "the detection")
        bbox = browser.execute_script("return JSON.parse(document.querySelector('#detections li').dataset.bbox)")
        assert bbox == pytest.approx(expected_box(rgb, *size), abs=2)
        until(browser, "document.getElementById('stat-engine').textContent.startsWith('ready')", 10, "the stats")
        # Only the answers from before the key was given may be 401s.
        assert errors_in(browser, allow=r"status of 401") == []

        # A reload in the same tab keeps the key: no dialog, no 401.
        browser.refresh()
        until(browser, "document.body.dataset.ready === 'true'", 20, "the console to start again")
        until(browser, "document.getElementById('model').value === 'pixels'", 15, "the models")
        assert not browser.execute_script("return document.getElementById('key-dialog').open")
        assert errors_in(browser) == []


def _write_docs_screenshot(shot: Path) -> None:
    """The README's copy: a 128-colour PNG, well under 300 KB."""
    DOCS_SCREENSHOT.parent.mkdir(exist_ok=True)
    with Image.open(shot) as img:
        small = img.convert("RGB").quantize(colors=128, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
        buf = io.BytesIO()
        small.save(buf, format="PNG", optimize=True)
    assert len(buf.getvalue()) < 300_000, len(buf.getvalue())
    tmp = DOCS_SCREENSHOT.with_suffix(".tmp")
    tmp.write_bytes(buf.getvalue())
    shutil.move(tmp, DOCS_SCREENSHOT)


def test_a_folder_runs_as_one_job_and_the_log_shows_it(browser: Any, tmp_path: Path) -> None:
    """Issue 17, point 5: a folder of images as one async batch job, its progress, then the log."""
    write_pixel_detector(tmp_path / "repo")
    folder = tmp_path / "holiday"
    folder.mkdir()
    colours = [(200, 40, 40), (40, 200, 90), (30, 30, 220), (120, 120, 20), (10, 90, 160)]
    for i, rgb in enumerate(colours):
        Image.new("RGB", (80, 60), rgb).save(folder / f"img{i}.png")
    (folder / "notes.txt").write_text("not an image")
    with Appliance(tmp_path / "repo", workers=2, env={"RINGSERVE_PREDICTION_LOG": "1"}) as app:
        open_console(browser, app.url)
        until(browser, "document.getElementById('history-note').dataset.state === 'on'", 15, "the log panel")
        assert browser.find_element("id", "history-note").text == "No prediction logged yet."
        # chromedriver sends files, not folders: the same input, its folder picker attribute off
        browser.execute_script("document.getElementById('folder').removeAttribute('webkitdirectory')")
        paths = sorted(str(p) for p in folder.iterdir())
        browser.find_element("id", "folder").send_keys("\n".join(paths))
        until(browser, "document.getElementById('job-status').dataset.status === 'done'", 30, "the job to finish")
        bar = browser.find_element("id", "job-progress")
        assert bar.get_attribute("value") == bar.get_attribute("max") == "5"
        rows = browser.find_elements("css selector", "#job-results li")
        assert [r.text.split("\n")[0] for r in rows] == [f"img{i}.png" for i in range(5)]
        assert all("thing 90%" in r.text for r in rows)
        # the job's five images are in the log, and a sync prediction too, newest first
        image = tmp_path / "one.png"
        Image.new("RGB", (80, 60), (1, 2, 3)).save(image)
        browser.find_element("id", "file").send_keys(str(image))
        until(browser, "document.querySelectorAll('#history li').length === 6", 15, "six logged predictions")
        first = browser.find_elements("css selector", "#history li")[0].text
        assert "pixels: thing 90%" in first and "/api/v1/models/pixels/predict" in first
        assert errors_in(browser) == []
