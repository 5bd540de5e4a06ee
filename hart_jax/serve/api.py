"""The JSON endpoint: ``POST /api/generate`` (prompts and settings in, PNGs as base64 out) and
``GET /api/stats`` (the batcher's counters). The schema is in ``docs/serving.md``; the checks in
``hart_jax.serve.schema``. Errors are ``{"error": "<one line>"}`` with a 4xx status (503 when
the queue is full, 500 when the generation itself failed).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time
from typing import Any

import numpy as np
from fastapi import Request  # module level: the route's annotations are resolved in this namespace
from fastapi.responses import JSONResponse

from hart_jax.serve.batcher import Batcher
from hart_jax.serve.schema import GenerateRequest, Limits, RequestError, parse_request

MAX_BODY_BYTES = 64 * 1024


def png_bytes(img_HWC: np.ndarray) -> bytes:
    """A uint8 ``[H, W, 3]`` image as PNG bytes (what ``sample.py`` writes)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img_HWC).save(buf, format="PNG")
    return buf.getvalue()


def settings_dict(req: GenerateRequest, resolution: int) -> dict[str, Any]:
    """The settings a request ran with (the answer's ``settings``)."""
    s = req.settings
    return {"cfg": s.cfg, "top_k": s.top_k, "top_p": s.top_p, "more_smooth": s.more_smooth,
            "images_per_prompt": req.images_per_prompt, "seed": req.seed, "resolution": resolution}


def response_body(req: GenerateRequest, images: np.ndarray, resolution: int, seconds: float) -> dict[str, Any]:
    """The endpoint's answer: one entry per image, in the request's order."""
    return {
        "images": [{"prompt": p, "seed": s, "png_base64": base64.b64encode(png_bytes(img)).decode("ascii")}
                   for (p, s), img in zip(req.items, images)],
        "settings": settings_dict(req, resolution),
        "seconds": round(seconds, 4),
    }


class Service:
    """What both front ends share: the batcher, the sampling defaults and the limits."""

    def __init__(self, batcher: Batcher, defaults: dict, resolution: int, limits: Limits = Limits()) -> None:
        self.batcher, self.defaults, self.resolution, self.limits = batcher, defaults, resolution, limits

    def parse(self, body: Any) -> GenerateRequest:
        """A checked request (``RequestError`` when not)."""
        return parse_request(body, self.defaults, self.resolution, self.limits)


def add_routes(app: Any, service: Service) -> None:
    """Add ``/api/generate`` and ``/api/stats`` to a FastAPI ``app``."""

    def error(e: RequestError) -> JSONResponse:
        return JSONResponse({"error": str(e)}, status_code=e.status)

    @app.post("/api/generate")
    async def generate(request: Request) -> JSONResponse:
        t0 = time.perf_counter()
        raw = await request.body()
        try:
            if len(raw) > MAX_BODY_BYTES:
                raise RequestError(f"request body of {len(raw)} bytes; the limit is {MAX_BODY_BYTES}", 413)
            try:
                body = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise RequestError(f"the body is not valid JSON ({e})") from None
            req = service.parse(body)
            job = service.batcher.submit(req)
            images = await asyncio.wrap_future(job.future)
        except RequestError as e:
            return error(e)
        return JSONResponse(response_body(req, images, service.resolution, time.perf_counter() - t0))

    @app.get("/api/stats")
    async def stats() -> JSONResponse:
        return JSONResponse(service.batcher.stats())
