"""The gateway's page at / in a real browser: Debian's headless chromium driven by Selenium
(chromium-driver), against the shared real server (tests/conftest.py ``role_server``).

The page loads, a synthetic image is uploaded through the file input, the answer streams in,
and the regions drawn over the image are checked against the response - both the one the page
received and an independent unary call with the same input (temperature 0). The screenshot is
saved in the test's tmp dir (and copied to ``$P2R_SCREENSHOT_OUT`` when set: docs/page.png).
"""

from __future__ import annotations

import base64
import io
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageDraw

from p2r.services.launch import ServerProc

pytestmark = pytest.mark.engine

QUESTION = "Which shape is red? (A) square (B) circle (C) triangle"
PERCEIVE_TOKENS = 300  # room for the schema's JSON, which the random tiny model pads with whitespace


def synthetic_image(path: Path) -> bytes:
    image = Image.new("RGB", (640, 480), "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle((60, 80, 220, 240), fill="red")
    draw.ellipse((300, 60, 460, 220), fill="royalblue")
    draw.polygon([(420, 420), (600, 420), (510, 270)], fill="seagreen")
    image.save(path)
    return path.read_bytes()


@pytest.fixture(scope="module")
def browser() -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    binary, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not (binary and driver_path):
        pytest.fail("chromium and chromedriver are needed (Debian: apt-get install chromium chromium-driver; "
                    "scripts/test.sh installs them)")
    options = Options()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1500,1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    yield driver
    driver.quit()


def test_page_streams_an_answer_and_draws_its_regions(browser: Any, role_server: ServerProc,
                                                       tmp_path: Path) -> None:
    import openai
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    base = f"http://127.0.0.1:{role_server.http_port}"
    image_path = tmp_path / "shapes.png"
    image = synthetic_image(image_path)
    oai = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=300)
    url = "data:image/png;base64," + base64.b64encode(image).decode()

    def ask_api(seed: int, **kw: Any) -> Any:
        return oai.chat.completions.create(
            model="p2r", temperature=0, messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": QUESTION}]}],
            extra_body={"p2r": {"answer_form": "mca", "structured": True,
                                "perceive": {"temperature": 1.0, "seed": seed, "max_tokens": PERCEIVE_TOKENS}}}, **kw)

    # The tiny model's boxes are random: take the first perceiver seed whose (schema-constrained)
    # reply holds a valid region, so the drawing has something to draw.
    with ThreadPoolExecutor(8) as pool:
        found = list(pool.map(lambda s: bool(ask_api(s, max_tokens=1).model_extra["p2r"]["regions"]), range(16)))
    assert any(found), "no perceiver seed in 0-15 gave a region"
    seed = found.index(True)

    browser.get(f"{base}/")
    assert browser.title.startswith("P2R")
    browser.find_element(By.ID, "image-input").send_keys(str(image_path))
    browser.find_element(By.ID, "question").send_keys(QUESTION)
    Select(browser.find_element(By.ID, "answer-form")).select_by_value("mca")
    browser.find_element(By.CSS_SELECTOR, "#perceiver-sampling summary").click()
    browser.find_element(By.ID, "structured").click()
    for field, value in (("perceive-temperature", "1"), ("perceive-seed", str(seed)),
                         ("perceive-max-tokens", str(PERCEIVE_TOKENS))):
        browser.find_element(By.ID, field).clear()
        browser.find_element(By.ID, field).send_keys(value)
    ask = browser.find_element(By.ID, "ask")
    WebDriverWait(browser, 30).until(lambda d: ask.is_enabled())  # the model list and the image loaded
    ask.click()
    WebDriverWait(browser, 300).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state")
                                      in ("done", "error"))
    state = browser.find_element(By.TAG_NAME, "body").get_attribute("data-state")
    assert state == "done", browser.find_element(By.ID, "error").text

    got = browser.execute_script("return window.p2rResult")
    # The same request, unary, from the official client: the same regions and answer (seeded
    # perceiver, greedy reasoner).
    ref = ask_api(seed)
    ext = ref.model_extra["p2r"]
    assert got["regions"] == ext["regions"] and got["answer"] == ext["answer"]
    assert got["regions"]

    width, height = Image.open(io.BytesIO(image)).size
    rects = browser.find_elements(By.CSS_SELECTOR, "#overlay rect.region")
    assert len(rects) == len(ext["regions"])
    for rect, r in zip(rects, ext["regions"], strict=True):
        drawn = [float(rect.get_attribute(a)) for a in ("x", "y", "width", "height")]
        expected = [r["x1"] / 1000 * width, r["y1"] / 1000 * height,
                    (r["x2"] - r["x1"]) / 1000 * width, (r["y2"] - r["y1"]) / 1000 * height]
        assert drawn == pytest.approx(expected, abs=1e-6)
        assert rect.get_attribute("data-label") == r["label"]
    labels = [t.get_attribute("textContent") for t in browser.find_elements(By.CSS_SELECTOR, "#overlay text")]
    assert labels == [f"{i + 1}: {r['label']}" if r["label"] else str(i + 1) for i, r in enumerate(ext["regions"])]
    canvases = browser.find_elements(By.CSS_SELECTOR, "#crops canvas")
    assert [[int(c.get_attribute("width")), int(c.get_attribute("height"))] for c in canvases] == \
        [[right - left, bottom - top] for left, top, right, bottom in ext["crops"]]
    assert browser.find_element(By.ID, "reasoning").get_attribute("textContent") == ref.choices[0].message.content
    assert browser.find_element(By.ID, "answer").get_attribute("textContent") == \
        (ext["answer"] or "(no <answer> in the reply)")
    timing_rows = browser.find_elements(By.CSS_SELECTOR, "#timings tr")
    assert [r.find_element(By.TAG_NAME, "td").text for r in timing_rows][:4] == \
        ["perceive", "evidence", "reason", "total (server)"]

    shot = tmp_path / "page.png"
    assert browser.save_screenshot(str(shot))
    assert Image.open(shot).size[0] > 0
    if out := os.environ.get("P2R_SCREENSHOT_OUT"):
        shutil.copyfile(shot, out)
