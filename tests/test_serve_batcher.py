"""The request batcher and the request checks, on a stand-in pipeline (no model, no JAX program):
which images share a call, at which compiled size, what a full queue and a failing call do.
The live server on the shipped model is tests/test_serve.py."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from hart_jax.serve.batcher import Batcher
from hart_jax.serve.schema import Limits, RequestError, Settings, parse_request

DEFAULTS = {"cfg": 3.0, "top_k": None, "top_p": 0.0, "more_smooth": True}
RES = 32


class FakePipe:
    """Images that depend on (prompt, seed, cfg) only, like the real pipeline's rows; records
    every call; ``gate`` (an Event) holds calls until set; a prompt ``"fail"`` raises."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[str], list[int], int, float]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    @staticmethod
    def image(prompt: str, seed: int, cfg: float) -> np.ndarray:
        return np.full((2, 2, 3), (len(prompt) * 7 + seed * 3 + int(cfg * 10)) % 256, np.uint8)

    def __call__(self, prompts, *, seed, batch_size, guidance_scale, top_k, top_p, more_smooth):
        self.entered.set()
        self.gate.wait(10)
        self.calls.append((list(prompts), list(seed), batch_size, guidance_scale))
        if "fail" in prompts:
            raise RuntimeError("out of memory\nwhile allocating")
        assert len(prompts) <= batch_size
        return np.stack([self.image(p, s, guidance_scale) for p, s in zip(prompts, seed)])


def request(prompts, seed=1, **kw):
    return parse_request(dict(prompts=list(prompts), seed=seed, **kw), DEFAULTS, RES)


@pytest.fixture
def fake():
    pipe = FakePipe()
    b = Batcher(pipe, batch_sizes=(1, 4), max_wait_s=5.0, max_queued_images=8).start()
    yield pipe, b
    pipe.gate.set()
    b.close()


def expected(req):
    return np.stack([FakePipe.image(p, s, req.settings.cfg) for p, s in req.items])


def test_concurrent_requests_share_one_call_of_the_smallest_size(fake):
    pipe, b = fake
    reqs = [request(["a red circle"], seed=3), request(["a blue square"], seed=10, images_per_prompt=2),
            request(["a cyan triangle"], seed=7)]
    jobs = [b.submit(r) for r in reqs]  # 4 images, the biggest size: runs without waiting 5 s
    for r, j in zip(reqs, jobs):
        np.testing.assert_array_equal(j.future.result(timeout=10), expected(r))
    assert [c[2] for c in pipe.calls] == [4] and b.pipeline_calls == 1 and b.padded == 0
    assert pipe.calls[0][1] == [3, 10, 11, 7]  # every image keeps its own seed


def test_other_settings_never_share_a_call_and_short_batches_pad():
    pipe = FakePipe()
    b = Batcher(pipe, batch_sizes=(1, 4), max_wait_s=0.2, max_queued_images=16).start()
    try:
        a = b.submit(request(["a red circle"], seed=1, cfg=1.0))
        c = b.submit(request(["a red circle"], seed=1, cfg=2.0, images_per_prompt=2))
        big = b.submit(request(["a green square"], seed=5, cfg=1.0, images_per_prompt=6))
        for j in (a, c, big):
            np.testing.assert_array_equal(j.future.result(timeout=10), expected(j.request))
    finally:
        b.close()
    by_cfg = sorted((c[3], len(c[0]), c[2]) for c in pipe.calls)
    # cfg 1: 1 + 6 images in a 4-batch and a padded 4-batch; cfg 2: 2 images in a padded 4-batch
    assert by_cfg == [(1.0, 3, 4), (1.0, 4, 4), (2.0, 2, 4)], by_cfg
    assert b.stats()["calls_per_batch_size"] == {"4": 3} and b.padded == 3 and b.images == 9


def test_a_lone_image_runs_at_size_one_after_the_wait():
    pipe = FakePipe()
    b = Batcher(pipe, batch_sizes=(1, 4), max_wait_s=0.05, max_queued_images=4).start()
    try:
        b.submit(request(["a red circle"])).future.result(timeout=10)
    finally:
        b.close()
    assert [c[2] for c in pipe.calls] == [1]


def test_queue_limit_answers_503_and_queues_nothing(fake):
    pipe, b = fake
    pipe.gate.clear()
    first = b.submit(request(["a red circle"], images_per_prompt=4))  # taken at once, held in the call
    assert pipe.entered.wait(10)
    waiting = [b.submit(request(["a red circle"], images_per_prompt=4)) for _ in range(2)]  # 8 queued: full
    with pytest.raises(RequestError, match=r"busy: 8 image\(s\) already queued and this request adds 1; "
                                           r"the limit is 8") as e:
        b.submit(request(["a blue square"]))
    assert e.value.status == 503 and b.queued_images == 8
    pipe.gate.set()
    b.set_max_wait(0.0)
    for j in [first, *waiting]:
        assert j.future.result(timeout=10).shape == (4, 2, 2, 3)
    assert b.submit(request(["a blue square"])).future.result(timeout=10).shape == (1, 2, 2, 3)


def test_a_failing_call_fails_its_requests_only(fake):
    pipe, b = fake
    bad = b.submit(request(["fail"], cfg=1.0))
    b.set_max_wait(0.0)
    with pytest.raises(RequestError, match=r"^generation failed: RuntimeError: out of memory while allocating$") as e:
        bad.future.result(timeout=10)
    assert e.value.status == 500 and b.failed_calls == 1
    ok = b.submit(request(["a red circle"], seed=4))
    np.testing.assert_array_equal(ok.future.result(timeout=10), expected(ok.request))


@pytest.mark.parametrize("body, message", [
    ({"prompt": ""}, r"^prompt holds no prompt \(empty or only whitespace\): ''$"),
    ({"prompts": ["a red circle", "  "]}, r"^prompts\[1\] holds no prompt"),
    ({"prompts": []}, r"^prompts must be a non-empty list of strings"),
    ({"prompt": "x", "prompts": ["y"]}, r"^give exactly one of 'prompt'"),
    ({"prompt": "a red circle", "steps": 50}, r"^unknown field\(s\) steps \(known: prompt, prompts, "),
    ({"prompt": "a red circle", "images_per_prompt": 17}, r"^too many images: 1 prompt\(s\) x 17 = 17; .* at most 16"),
    ({"prompt": "a red circle", "images_per_prompt": 0}, r"^images_per_prompt must be an integer >= 1, got 0$"),
    ({"prompt": "a red circle", "resolution": 100000}, r"^unsupported resolution 100000: this checkpoint generates 32x32$"),
    ({"prompt": "x" * 501}, r"^prompt has 501 characters; this server takes at most 500$"),
    ({"prompt": "a red circle", "seed": -1}, r"^seed must be in 0\.\.4294967295"),
    ({"prompt": "a red circle", "seed": 2**32 - 1, "images_per_prompt": 2}, r"^seed 4294967295 with 2 images"),
    ({"prompt": "a red circle", "seed": "7"}, r"^seed must be an integer"),
    ({"prompt": "a red circle", "cfg": -1}, r"^cfg must be a finite number >= 0"),
    ({"prompt": "a red circle", "top_k": 2.5}, r"^top_k must be an integer >= 0"),
    ({"prompt": "a red circle", "top_p": 1.0}, r"^top_p must be in \[0, 1\)"),
    ({"prompt": "a red circle", "more_smooth": "yes"}, r"^more_smooth must be true or false, got 'yes'$"),
    (["a red circle"], r"^the request must be a JSON object, got list$"),
])
def test_bad_requests_are_refused_with_one_line(body, message):
    with pytest.raises(RequestError, match=message) as e:
        parse_request(body, DEFAULTS, RES, Limits(max_images=16, max_prompt_chars=500))
    assert e.value.status == 400 and "\n" not in str(e.value)


def test_request_defaults_and_random_seed():
    r = parse_request({"prompts": ["a", "b"], "images_per_prompt": 2, "seed": 9, "top_k": 0}, DEFAULTS, RES)
    assert r.items == [("a", 9), ("a", 10), ("b", 11), ("b", 12)]
    assert r.settings == Settings(cfg=3.0, top_k=0, top_p=0.0, more_smooth=True)
    seeds = {parse_request({"prompt": "a"}, DEFAULTS, RES).seed for _ in range(4)}
    assert len(seeds) > 1  # absent seed: a random one per request


@pytest.mark.parametrize("argv, message", [
    (["--port", "70000"], "error: --port must be in 0..65535, got 70000\n"),
    (["--max-images", "100"], "error: --max-queued-images (64) must be >= --max-images (100): a request that may "
                             "never fit would always be refused\n"),
    (["--max-wait-ms", "-1"], "error: --max-wait-ms must be >= 0, got -1.0\n"),
    (["--ckpt", "/nonexistent/ckpt"], "error: /nonexistent/ckpt: checkpoint directory not found\n"),
])
def test_cli_bad_flags_exit_2_before_loading(argv, message, capsys):
    from hart_jax.serve.__main__ import main

    assert main(argv) == 2
    assert capsys.readouterr().err == message


def test_cli_bad_batch_sizes_exit_2(capsys):
    from hart_jax.serve.__main__ import main

    with pytest.raises(SystemExit) as e:
        main(["--batch-sizes", "4,0"])
    assert e.value.code == 2
    assert capsys.readouterr().err == "error: argument --batch-sizes: batch sizes must be >= 1, got '4,0' (see --help)\n"
