"""The web page (Gradio) and the server: one FastAPI app on one port serving the page at ``/``,
the JSON endpoint at ``/api/generate`` and the counters at ``/api/stats``, all through one
:class:`~hart_jax.serve.batcher.Batcher`.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import socket
import tempfile
import threading
import time
import zipfile
from pathlib import Path
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from the server

from hart_jax.serve.api import Service, add_routes, png_bytes, settings_dict
from hart_jax.serve.schema import RequestError

TITLE = "HART (JAX) text-to-image"
POLL_S = 0.1  # how often the page's progress bar is updated while a request waits
KEEP_ZIPS = 64


def _form_body(prompts: str, seed: Any, random_seed: bool, cfg: float, top_k: Any, top_p: float,
               more_smooth: bool, per_prompt: Any) -> dict[str, Any]:
    """The page's fields as a JSON request (the endpoint's schema): one prompt per line; an empty
    top-k is the release's rule; whole numbers from the page's number boxes become ints."""

    def whole(v: Any) -> Any:
        return int(v) if isinstance(v, float) and v.is_integer() else v

    def integer(text: str) -> Any:  # the top-k box's text; a non-integer goes on to the check as it is
        try:
            return int(text)
        except ValueError:
            return text

    lines = [p.strip() for p in (prompts or "").splitlines() if p.strip()]
    return {"prompts": lines or [prompts or ""], "seed": None if random_seed else whole(seed), "cfg": cfg,
            "top_k": None if not (top_k or "").strip() else integer(top_k.strip()), "top_p": top_p,
            "more_smooth": more_smooth, "images_per_prompt": whole(per_prompt)}


def build_page(service: Service) -> Any:
    """The Gradio page: prompt(s), seed (or random), guidance, top-k / top-p, more_smooth, images per
    prompt; a gallery whose captions give each image's prompt and seed, the settings as JSON, a zip
    of the PNGs + settings.json to download, and a progress bar while the batch runs."""
    import gradio as gr

    d, lim = service.defaults, service.limits
    out_root = Path(tempfile.mkdtemp(prefix="hart_jax_serve_"))  # the zips; the newest KEEP_ZIPS are kept
    zips: collections.deque[Path] = collections.deque()
    zips_lock = threading.Lock()

    def generate(prompts, seed, random_seed, cfg, top_k, top_p, more_smooth, per_prompt, progress=gr.Progress()):
        t0 = time.perf_counter()
        try:
            req = service.parse(_form_body(prompts, seed, random_seed, cfg, top_k, top_p, more_smooth, per_prompt))
            job = service.batcher.submit(req)
            n = len(job.images)
            while not job.future.done():
                progress(job.done / n, desc=f"{job.state}: {job.done}/{n} image(s)")
                try:
                    job.future.exception(timeout=POLL_S)
                except TimeoutError:
                    pass
            images = job.future.result()
        except RequestError as e:
            raise gr.Error(str(e))
        settings = dict(settings_dict(req, service.resolution), seconds=round(time.perf_counter() - t0, 3),
                        images=[{"prompt": p, "seed": s, "file": f"{i:03d}_seed{s}.png"}
                                for i, (p, s) in enumerate(req.items)])
        path = Path(tempfile.mkdtemp(dir=out_root)) / f"hart_seed{req.seed}.zip"  # unique per request
        with zipfile.ZipFile(path, "w") as z:
            for entry, img in zip(settings["images"], images):
                z.writestr(entry["file"], png_bytes(img))
            z.writestr("settings.json", json.dumps(settings, indent=2) + "\n")
        with zips_lock:
            zips.append(path)
            old = zips.popleft() if len(zips) > KEEP_ZIPS else None
        if old is not None:
            shutil.rmtree(old.parent, ignore_errors=True)
        gallery = [(img, f"{p} (seed {s})") for (p, s), img in zip(req.items, images)]
        return gallery, settings, gr.DownloadButton(value=str(path), visible=True)

    # Gradio's copies of the images and zips: deleted hourly once an hour old
    with gr.Blocks(title=TITLE, delete_cache=(3600, 3600)) as page:
        gr.Markdown(f"## {TITLE}\nOne prompt per line. Images of concurrent visitors share compiled batches.")
        with gr.Row():
            with gr.Column():
                prompts = gr.Textbox(label="prompt(s)", lines=3, value=(d.get("prompts") or ["a red circle"])[0],
                                     elem_id="prompts")
                with gr.Row():
                    seed = gr.Number(label="seed (image i: seed + i)", value=1, precision=0, minimum=0)
                    random_seed = gr.Checkbox(label="random seed", value=False)
                cfg = gr.Slider(0.0, 10.0, value=d["cfg"], step=0.1, label="guidance scale (cfg)")
                with gr.Row():
                    top_k = gr.Textbox(label="top-k (0: every token; empty: the release's 600/300 rule)",
                                       value="" if d["top_k"] is None else str(d["top_k"]), max_lines=1)
                    top_p = gr.Slider(0.0, 0.99, value=d["top_p"], step=0.01, label="top-p (0: off)")
                more_smooth = gr.Checkbox(label="more_smooth (Gumbel-softmax smoothing)", value=d["more_smooth"])
                per_prompt = gr.Slider(1, lim.max_images, value=1, step=1, label="images per prompt")
                button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column():
                gallery = gr.Gallery(label="results", columns=4, fit_columns=False, height=360, format="png",
                                     interactive=False, elem_id="gallery",
                                     buttons=["download", "download_all", "fullscreen"])
                download = gr.DownloadButton("Download PNGs + settings (zip)", visible=False, elem_id="download")
                settings = gr.JSON(label="settings")
        # concurrency_limit=None: every visitor's request goes straight to the batcher, which batches
        # them (Gradio's default of one at a time would queue them in front of it).
        inputs = [prompts, seed, random_seed, cfg, top_k, top_p, more_smooth, per_prompt]
        button.click(generate, inputs, [gallery, settings, download], concurrency_limit=None)
    return page


def build_app(service: Service) -> Any:
    """The FastAPI app: the JSON routes, then the page mounted at ``/``."""
    import gradio as gr
    from fastapi import FastAPI

    app = FastAPI(title=TITLE)
    add_routes(app, service)
    page = build_page(service)
    return gr.mount_gradio_app(app, page, path="/", footer_links=[], run_history=False,
                               css="#gallery img {image-rendering: pixelated}")  # small images stay sharp


class Server:
    """A uvicorn server of :func:`build_app` on a thread (tests, benchmarks) or in the foreground
    (``python -m hart_jax.serve``). ``port=0`` picks a free port; ``url`` is where it listens."""

    def __init__(self, service: Service, host: str = "127.0.0.1", port: int = 0) -> None:
        import uvicorn

        self.service = service
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))  # an OSError (port in use) before anything else starts
        self.host, self.port = host, self.sock.getsockname()[1]
        config = uvicorn.Config(build_app(service), log_level="warning", timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """``http://host:port``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def serve_forever(self) -> None:
        """Run in this thread until interrupted."""
        self.server.run(sockets=[self.sock])

    def start(self, timeout: float = 60.0) -> "Server":
        """Run on a daemon thread; returns once it accepts connections."""
        self._thread = threading.Thread(target=self.serve_forever, name="hart-serve", daemon=True)
        self._thread.start()
        t_end = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > t_end:
                raise RuntimeError("the server did not start")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        """Stop the server thread and the batcher."""
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(30)
        self.service.batcher.close()


def load_service(ckpt: Any = None, batch_sizes: Any = None, max_wait_s: float = 0.05,
                 max_queued_images: int = 64, limits: Any = None, compile_cache: Any = None,
                 warm_up: bool = True, log: Any = None) -> Service:
    """Load the pipeline (default: the shipped model), compile every batch size for the default
    settings, and start the batcher. ``batch_sizes``: the compiled sizes (default
    ``DEFAULT_BATCH_SIZES``)."""
    from hart_jax.builtin import DEFAULT_CKPT
    from hart_jax.pipeline import HARTPipeline, check_pipeline_dir
    from hart_jax.sample_cli import sampling_defaults
    from hart_jax.serve.batcher import DEFAULT_BATCH_SIZES, Batcher
    from hart_jax.serve.schema import Limits, Settings

    ckpt = Path(DEFAULT_CKPT if ckpt is None else ckpt)
    check_pipeline_dir(ckpt)
    defaults = sampling_defaults(ckpt)
    limits = limits or Limits()
    batcher = Batcher(None, DEFAULT_BATCH_SIZES if batch_sizes is None else batch_sizes, max_wait_s, max_queued_images)  # argument checks before loading
    if max_queued_images < limits.max_images:
        raise ValueError(f"the queue limit ({max_queued_images} images) is below one request's limit "
                           f"({limits.max_images} images)")
    t0 = time.perf_counter()
    batcher.pipe = HARTPipeline.from_converted(ckpt, compile_cache=compile_cache)
    if log:
        log(f"loaded {ckpt} in {time.perf_counter() - t0:.1f} s ({batcher.pipe.resolution} px)")
    if warm_up:
        batcher.warm_up(Settings(float(defaults["cfg"]), defaults["top_k"], float(defaults["top_p"]),
                                 defaults["more_smooth"]))
        if log:
            log("compiled batch sizes " + ", ".join(f"{b} ({s:.1f} s)" for b, s in batcher.warmup_seconds.items()))
    batcher.start()
    return Service(batcher, defaults, batcher.pipe.resolution, limits)

