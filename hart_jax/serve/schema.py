"""The generation request of the JSON endpoint and the web page: its fields, its defaults and
its checks (the rules of ``sample.py``'s flags, from ``hart_jax.sample_cli``, plus the server's
size limits). A bad request is a :class:`RequestError`: one line naming the field, and the HTTP
status to answer with.
"""

from __future__ import annotations

import dataclasses
import secrets
from typing import Any

from hart_jax.errors import HartError
from hart_jax.sample_cli import SEED_MAX, check_cfg, check_prompt, check_seed, check_top_k, check_top_p

# Every field a request may hold (anything else is refused): the docs' schema (docs/serving.md).
FIELDS = ("prompt", "prompts", "seed", "cfg", "top_k", "top_p", "more_smooth", "images_per_prompt", "resolution")


class RequestError(HartError):
    """A request the server refuses: ``status`` is the HTTP status (4xx, or 503 when full)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one request may ask for: images (prompts x images per prompt), prompts, characters
    per prompt."""

    max_images: int = 16
    max_prompt_chars: int = 500


@dataclasses.dataclass(frozen=True)
class Settings:
    """The sampling settings a batch shares (requests with other settings never share a pipeline
    call): the guidance scale (a runtime input of the program) and the settings that shape it."""

    cfg: float
    top_k: int | None
    top_p: float
    more_smooth: bool

    def pipeline_kwargs(self) -> dict[str, Any]:
        """Keywords of ``HARTPipeline.__call__``."""
        return dict(guidance_scale=self.cfg, top_k=self.top_k, top_p=self.top_p, more_smooth=self.more_smooth)


@dataclasses.dataclass(frozen=True)
class GenerateRequest:
    """A checked request: image i is ``prompts[i // images_per_prompt]`` with seed ``seed + i``."""

    prompts: tuple[str, ...]
    seed: int
    images_per_prompt: int
    settings: Settings

    @property
    def items(self) -> list[tuple[str, int]]:
        """``(prompt, seed)`` of every image, prompt-major (``sample.py``'s order)."""
        every = [p for p in self.prompts for _ in range(self.images_per_prompt)]
        return [(p, self.seed + i) for i, p in enumerate(every)]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check(fn: Any, *args: Any) -> None:
    try:
        fn(*args)
    except HartError as e:
        raise RequestError(str(e)) from None


def parse_request(body: Any, defaults: dict, resolution: int, limits: Limits = Limits()) -> GenerateRequest:
    """Check a decoded JSON request against the schema and ``limits``; absent settings take
    ``defaults`` (the checkpoint's ``sampling.json`` over the release's, as ``sample.py``), an
    absent or null seed a random one. Raises :class:`RequestError` naming the first problem."""
    if not isinstance(body, dict):
        raise RequestError(f"the request must be a JSON object, got {type(body).__name__}")
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise RequestError(f"unknown field(s) {', '.join(unknown)} (known: {', '.join(FIELDS)})")
    if ("prompt" in body) == ("prompts" in body):
        raise RequestError("give exactly one of 'prompt' (a string) or 'prompts' (a list of strings)")
    if "prompt" in body:
        prompts, names = [body["prompt"]], ["prompt"]
    else:
        prompts = body["prompts"]
        if not isinstance(prompts, list) or not prompts:
            raise RequestError(f"prompts must be a non-empty list of strings, got {prompts!r:.80}")
        names = [f"prompts[{i}]" for i in range(len(prompts))]
    for prompt, name in zip(prompts, names):
        _check(check_prompt, prompt, name)
        if len(prompt) > limits.max_prompt_chars:
            raise RequestError(f"{name} has {len(prompt)} characters; "
                               f"this server takes at most {limits.max_prompt_chars}")
    per_prompt = body.get("images_per_prompt", 1)
    if not (_is_int(per_prompt) and per_prompt >= 1):
        raise RequestError(f"images_per_prompt must be an integer >= 1, got {per_prompt!r}")
    n = len(prompts) * per_prompt
    if n > limits.max_images:
        raise RequestError(f"too many images: {len(prompts)} prompt(s) x {per_prompt} = {n}; "
                           f"this server takes at most {limits.max_images} per request")
    res = body.get("resolution")
    if res is not None and res != resolution:
        raise RequestError(f"unsupported resolution {res!r}: this checkpoint generates {resolution}x{resolution}")
    seed = body.get("seed")
    if seed is None:
        seed = secrets.randbelow(SEED_MAX - n + 2)  # every image's seed stays in 0..SEED_MAX
    elif not _is_int(seed):
        raise RequestError(f"seed must be an integer in 0..{SEED_MAX} or null (random), got {seed!r}")
    _check(check_seed, seed, n, "seed")
    cfg = body.get("cfg", defaults["cfg"])
    _check(check_cfg, cfg, "cfg")
    top_k = body.get("top_k", defaults["top_k"])
    if top_k is not None:
        _check(check_top_k, top_k, "top_k")
    top_p = body.get("top_p", defaults["top_p"])
    _check(check_top_p, top_p, "top_p")
    more_smooth = body.get("more_smooth", defaults["more_smooth"])
    if not isinstance(more_smooth, bool):
        raise RequestError(f"more_smooth must be true or false, got {more_smooth!r}")
    settings = Settings(cfg=float(cfg), top_k=top_k, top_p=float(top_p), more_smooth=more_smooth)
    return GenerateRequest(prompts=tuple(prompts), seed=seed, images_per_prompt=per_prompt, settings=settings)
