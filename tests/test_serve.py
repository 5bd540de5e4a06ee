"""The server on the shipped model, started once for this module on a free localhost port: the JSON
endpoint against sample.py, concurrent requests sharing compiled calls, bad requests, the queue
limit, a failing call, and the web page in headless Chromium (Debian's chromium +
chromium-driver, through Selenium; no browser is downloaded).

The server compiles ONE batch size (4) at start-up, so a request alone and a request in company
run the same program: every image must be bit-identical (a row's result does not depend on the
other rows). Programs of other batch sizes may move a pixel by one uint8 level (docs/serving.md).
"""

from __future__ import annotations

import base64
import io
import json
import os
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

BATCH = 4
MAX_QUEUED = 8


@pytest.fixture(scope="module")
def server():
    from hart_jax.serve.app import Server, load_service
    from hart_jax.serve.schema import Limits

    service = load_service(batch_sizes=(BATCH,), max_wait_s=0.05, max_queued_images=MAX_QUEUED,
                           limits=Limits(max_images=4))
    srv = Server(service).start()
    yield srv
    srv.stop()


def post(server, body, timeout=120) -> tuple[int, dict]:
    """POST ``body`` (a dict, or raw bytes) to /api/generate: (status, decoded JSON answer)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(server.url + "/api/generate", data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def stats(server) -> dict:
    with urllib.request.urlopen(server.url + "/api/stats", timeout=30) as r:
        return json.loads(r.read())


def png(entry: dict) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(entry["png_base64"]))))


def test_endpoint_gives_sample_py_image(server, tmp_path):
    from PIL import Image

    from hart_jax.sample_cli import main

    calls = stats(server)["pipeline_calls"]
    compiles = server.service.batcher.pipe.num_compiles  # compiled at start-up, not by a request
    status, body = post(server, {"prompt": "a red circle", "seed": 3})
    assert status == 200, body
    assert server.service.batcher.pipe.num_compiles == compiles == 1
    assert [(e["prompt"], e["seed"]) for e in body["images"]] == [("a red circle", 3)]
    assert body["settings"] == {"cfg": 3.0, "top_k": None, "top_p": 0.0, "more_smooth": True,  # sampling.json's
                                "images_per_prompt": 1, "seed": 3, "resolution": 32}
    assert stats(server)["pipeline_calls"] == calls + 1
    assert main(["--prompt", "a red circle", "--seed", "3", "--batch-size", str(BATCH), "--out-dir",
                 str(tmp_path), "--no-progress"]) == 0
    want = np.asarray(Image.open(tmp_path / "00000_p0000_seed3.png"))
    got = png(body["images"][0])
    assert got.shape == (32, 32, 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, want)


def test_concurrent_requests_share_calls_and_keep_their_images(server):
    reqs = [{"prompt": p, "seed": s} for p, s in
            [("a blue square", 11), ("a green triangle", 5), ("a yellow circle", 70), ("a blue square", 12)]]
    alone = []
    for r in reqs:
        status, body = post(server, r)
        assert status == 200, body
        alone.append(png(body["images"][0]))
    assert not np.array_equal(alone[0], alone[3])  # same prompt, other seed: another image
    b = server.service.batcher
    calls = stats(server)["pipeline_calls"]
    answers: list = [None] * len(reqs)
    start = threading.Barrier(len(reqs))

    def client(i):
        start.wait(30)
        answers[i] = post(server, reqs[i])

    b.set_max_wait(10.0)  # the 4 images fill a batch at once; a straggler would still join
    try:
        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(reqs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    finally:
        b.set_max_wait(0.05)
    used = stats(server)["pipeline_calls"] - calls
    assert used < len(reqs), f"{len(reqs)} concurrent requests took {used} pipeline calls"
    for i, (status, body) in enumerate(answers):
        assert status == 200, body
        np.testing.assert_array_equal(png(body["images"][0]), alone[i], err_msg=f"request {i}")


@pytest.mark.parametrize("body, status, message", [
    (b"{not json", 400, "the body is not valid JSON (Expecting property name enclosed in double quotes: line 1 column 2"),
    ({"prompt": "   "}, 400, "prompt holds no prompt (empty or only whitespace): '   '"),
    ({"prompt": "a red circle", "guidance": 3}, 400, "unknown field(s) guidance (known: prompt, prompts, seed, "),
    ({"prompt": "a red circle", "images_per_prompt": 5}, 400, "too many images: 1 prompt(s) x 5 = 5; this server "
                                                              "takes at most 4 per request"),
    ({"prompt": "a red circle", "resolution": 1 << 20}, 400, "unsupported resolution 1048576: this checkpoint "
                                                              "generates 32x32"),
    ({"prompt": "a red circle", "seed": -5}, 400, "seed must be in 0..4294967295"),
    (b'{"prompt": "' + b"x" * 70000 + b'"}', 413, "request body of 70014 bytes; the limit is 65536"),
])
def test_bad_requests_get_4xx_and_one_line(server, body, status, message):
    calls = stats(server)["pipeline_calls"]
    got_status, answer = post(server, body)
    assert got_status == status and answer["error"].startswith(message), (got_status, answer)
    assert "\n" not in answer["error"] and stats(server)["pipeline_calls"] == calls


def test_queue_limit_answers_503(server):
    b = server.service.batcher
    # Two requests of 3 images with different guidance (never one call) wait: 6 of 8 places.
    waiting = [{"prompt": "a red square", "seed": 1, "images_per_prompt": 3, "cfg": c} for c in (3.0, 2.0)]
    answers: list = []
    b.set_max_wait(60.0)
    try:
        threads = [threading.Thread(target=lambda r=r: answers.append(post(server, r))) for r in waiting]
        for t in threads:
            t.start()
        t_end = time.monotonic() + 60
        while b.queued_images < 6:
            assert time.monotonic() < t_end, "the two requests never queued"
            time.sleep(0.02)
        status, answer = post(server, {"prompt": "a red square", "images_per_prompt": 3})
        assert status == 503, answer
        assert answer["error"] == "busy: 6 image(s) already queued and this request adds 3; the limit is 8, retry later"
        assert b.queued_images == 6  # the refused request queued nothing
    finally:
        b.set_max_wait(0.05)
    for t in threads:
        t.join(120)
    assert sorted(s for s, _ in answers) == [200, 200] and all(len(a["images"]) == 3 for _, a in answers)


def test_a_failing_call_does_not_take_the_server_down(server, monkeypatch):
    class Broken:
        def __call__(self, *a, **kw):
            raise FloatingPointError("NaN in the logits\nat scale 3")

    real = server.service.batcher.pipe
    monkeypatch.setattr(server.service.batcher, "pipe", Broken())
    status, answer = post(server, {"prompt": "a red circle", "seed": 1})
    assert status == 500 and answer == {"error": "generation failed: FloatingPointError: NaN in the logits at scale 3"}
    monkeypatch.setattr(server.service.batcher, "pipe", real)
    status, answer = post(server, {"prompt": "a red circle", "seed": 1})
    assert status == 200 and len(answer["images"]) == 1


def test_page_in_headless_chromium(server):
    """Load the page, type two prompts, press Generate, see the images in the gallery with their
    captions, the first the image the endpoint gives for that prompt and seed at the defaults.
    ``HART_SERVE_SCREENSHOT=PATH`` also saves a screenshot (docs/images/serve.png comes from it)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as DriverService
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,900"):
        opts.add_argument(a)
    driver = webdriver.Chrome(service=DriverService("/usr/bin/chromedriver"), options=opts)
    try:
        driver.get(server.url + "/")
        wait = WebDriverWait(driver, 60)
        box = wait.until(EC.element_to_be_clickable((By.CSS_SELECTOR, "#prompts textarea")))
        box.clear()
        box.send_keys("a green square\na red circle")  # one prompt per line
        calls = stats(server)["pipeline_calls"]
        driver.find_element(By.CSS_SELECTOR, "#generate").click()
        img = wait.until(EC.visibility_of_element_located((By.CSS_SELECTOR, "#gallery img")))
        wait.until(lambda d: "a red circle (seed 2)" in d.find_element(By.ID, "gallery").text)
        assert "a green square (seed 1)" in driver.find_element(By.ID, "gallery").text
        assert stats(server)["pipeline_calls"] == calls + 1
        with urllib.request.urlopen(img.get_attribute("src"), timeout=30) as r:  # the page's PNG
            from PIL import Image

            shown = np.asarray(Image.open(io.BytesIO(r.read())).convert("RGB"))
        status, body = post(server, {"prompt": "a green square", "seed": 1})  # the page's defaults = the API's
        assert status == 200
        np.testing.assert_array_equal(shown, png(body["images"][0]))
        if os.environ.get("HART_SERVE_SCREENSHOT"):
            time.sleep(0.5)
            driver.save_screenshot(os.environ["HART_SERVE_SCREENSHOT"])
    finally:
        driver.quit()
