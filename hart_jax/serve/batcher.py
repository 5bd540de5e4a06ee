"""Request batching: images of concurrent requests share one compiled pipeline call.

Every request becomes its images, each ``(prompt, seed)``. One worker thread owns the pipeline.
It takes the oldest waiting image, waits until that image has waited ``max_wait_s`` or a full
batch of images with the same :class:`~hart_jax.serve.schema.Settings` is there, then runs at
most ``max(batch_sizes)`` of them in ONE call of the smallest compiled batch size that holds them
(the pipeline pads the rest). Image i's seed is a runtime input of its own row, so a request gets
the images its seeds give alone (up to the float reordering of programs of other batch sizes,
which can move a pixel by one uint8 level; ``docs/serving.md``).

Requests with other settings never share a call: the guidance scale is one scalar per call, and
top-k / top-p / more_smooth shape the program. The program of every batch size is compiled at
start-up (:meth:`Batcher.warm_up`, or loaded from JAX's compilation cache) for the default
settings; other top-k / top-p / more_smooth values compile once on first use.

Waiting images are bounded (``max_queued_images``): a request that would exceed it is refused
(:class:`~hart_jax.serve.schema.RequestError` with status 503), not queued. A pipeline call that
raises fails the requests in it and nothing else.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import threading
import time
from collections import Counter
from typing import Any, Sequence

import numpy as np

from hart_jax.serve.schema import GenerateRequest, RequestError, Settings


@dataclasses.dataclass
class Job:
    """One request in flight: its images fill in as their batches finish; ``future`` resolves to
    the ``[N, H, W, 3]`` uint8 images in the request's order (or the batch's exception)."""

    request: GenerateRequest
    future: concurrent.futures.Future
    images: list[np.ndarray | None]
    done: int = 0
    running: int = 0  # images in the pipeline call now running

    @property
    def state(self) -> str:
        """``queued``, ``running`` or ``done`` (for progress displays)."""
        if self.future.done():
            return "done"
        return "running" if self.running else "queued"


@dataclasses.dataclass
class _Item:
    job: Job
    index: int
    prompt: str
    seed: int
    settings: Settings
    arrived: float


# One compiled size by default: every request then gets bit-identically the images its seeds
# give alone, whatever else shares its call (programs of different sizes may differ by one
# uint8 level; docs/serving.md). More sizes (e.g. 1,4,16) trade that for a lone request's latency.
DEFAULT_BATCH_SIZES: tuple[int, ...] = (8,)


class Batcher:
    """Gathers the images of concurrent requests into the pipeline's compiled batch sizes.

    ``pipe``: a ``HARTPipeline`` (called only from the worker thread). ``batch_sizes``: the
    compiled sizes, e.g. ``(1, 4)``. Counters: ``pipeline_calls`` (after warm-up), ``images``,
    ``padded`` (empty rows), ``batches`` (calls per batch size), ``failed_calls``.
    """

    def __init__(self, pipe: Any, batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES, max_wait_s: float = 0.05,
                 max_queued_images: int = 64) -> None:
        sizes = sorted(set(int(b) for b in batch_sizes))
        if not sizes or sizes[0] < 1:
            raise ValueError(f"batch sizes must be integers >= 1, got {list(batch_sizes)}")
        if max_wait_s < 0:
            raise ValueError(f"the batching wait must be >= 0 s, got {max_wait_s}")
        if max_queued_images < 1:
            raise ValueError(f"the queue limit must be >= 1 image, got {max_queued_images}")
        self.pipe = pipe
        self.batch_sizes = sizes
        self.max_wait_s = float(max_wait_s)
        self.max_queued_images = int(max_queued_images)
        self._cond = threading.Condition()
        self._pending: list[_Item] = []
        self._stop = False
        self._thread: threading.Thread | None = None
        self.pipeline_calls = 0
        self.failed_calls = 0
        self.images = 0
        self.padded = 0
        self.batches: Counter[int] = Counter()
        self.warmup_seconds: dict[int, float] = {}

    # ------------------------------------------------------------ lifecycle
    def warm_up(self, settings: Settings, prompt: str = "warm-up") -> None:
        """Compile (or load from the compilation cache) the program of every batch size for
        ``settings`` by running it once; not counted in ``pipeline_calls``."""
        for bs in self.batch_sizes:
            t0 = time.perf_counter()
            self.pipe([prompt] * bs, seed=0, batch_size=bs, **settings.pipeline_kwargs())
            self.warmup_seconds[bs] = time.perf_counter() - t0

    def start(self) -> "Batcher":
        """Start the worker thread (a daemon)."""
        self._thread = threading.Thread(target=self._run, name="hart-batcher", daemon=True)
        self._thread.start()
        return self

    def close(self, timeout: float = 30.0) -> None:
        """Stop the worker after the call it is running; waiting requests fail."""
        with self._cond:
            self._stop = True
            left, self._pending = self._pending, []
            self._cond.notify_all()
        for item in left:
            if not item.job.future.done():
                item.job.future.set_exception(RequestError("the server is shutting down", 503))
        if self._thread is not None:
            self._thread.join(timeout)

    def set_max_wait(self, seconds: float) -> None:
        """Change the batching wait; the worker applies it at once."""
        with self._cond:
            self.max_wait_s = float(seconds)
            self._cond.notify_all()

    # --------------------------------------------------------------- submit
    def submit(self, request: GenerateRequest) -> Job:
        """Queue ``request``'s images; raises ``RequestError(503)`` when the queue limit would be
        passed (nothing is queued then)."""
        items = request.items
        job = Job(request, concurrent.futures.Future(), [None] * len(items))
        now = time.monotonic()
        with self._cond:
            if self._stop or self._thread is None:
                raise RequestError("the server is not running its generator", 503)
            queued = len(self._pending)
            if queued + len(items) > self.max_queued_images:
                raise RequestError(f"busy: {queued} image(s) already queued and this request adds {len(items)}; "
                                   f"the limit is {self.max_queued_images}, retry later", 503)
            self._pending.extend(_Item(job, i, p, s, request.settings, now) for i, (p, s) in enumerate(items))
            self._cond.notify_all()
        return job

    @property
    def queued_images(self) -> int:
        """Images waiting for a pipeline call."""
        with self._cond:
            return len(self._pending)

    def stats(self) -> dict[str, Any]:
        """The counters, for ``/api/stats``."""
        with self._cond:
            return {"pipeline_calls": self.pipeline_calls, "failed_calls": self.failed_calls, "images": self.images,
                    "padded_rows": self.padded, "queued_images": len(self._pending),
                    "calls_per_batch_size": {str(k): v for k, v in sorted(self.batches.items())},
                    "batch_sizes": self.batch_sizes, "max_wait_s": self.max_wait_s,
                    "max_queued_images": self.max_queued_images,
                    "warmup_seconds": {str(k): round(v, 3) for k, v in self.warmup_seconds.items()}}

    # --------------------------------------------------------------- worker
    def _take(self) -> list[_Item] | None:
        """Block until a batch is due; remove and return it (None: stopping)."""
        biggest = self.batch_sizes[-1]
        with self._cond:
            while True:
                if self._stop:
                    return None
                if not self._pending:
                    self._cond.wait()
                    continue
                key = self._pending[0].settings
                same = [it for it in self._pending if it.settings == key]
                wait = self._pending[0].arrived + self.max_wait_s - time.monotonic()
                if len(same) >= biggest or wait <= 0:
                    batch = same[:biggest]
                    taken = set(map(id, batch))
                    self._pending = [it for it in self._pending if id(it) not in taken]
                    for it in batch:
                        it.job.running += 1
                    return batch
                self._cond.wait(wait)

    def _run(self) -> None:
        while (batch := self._take()) is not None:
            self._run_batch(batch)

    def _run_batch(self, batch: list[_Item]) -> None:
        n = len(batch)
        bs = next(b for b in self.batch_sizes if b >= n)
        try:
            images = self.pipe([it.prompt for it in batch], seed=[it.seed for it in batch], batch_size=bs,
                               **batch[0].settings.pipeline_kwargs())
        except Exception as e:  # the requests in this call fail; the worker goes on
            with self._cond:
                self.failed_calls += 1
            msg = f"generation failed: {type(e).__name__}: {' '.join(str(e).split())}"[:300]
            for it in batch:
                it.job.running -= 1
                if not it.job.future.done():
                    it.job.future.set_exception(RequestError(msg, 500))
            return
        with self._cond:
            self.pipeline_calls += 1
            self.images += n
            self.padded += bs - n
            self.batches[bs] += 1
        for it, img in zip(batch, images):
            job = it.job
            job.running -= 1
            if job.future.done():  # failed in another batch
                continue
            job.images[it.index] = img
            job.done += 1
            if job.done == len(job.images):
                job.future.set_result(np.stack(job.images))
