"""Load test of the JSON endpoint: images/s and p50 / p95 latency for 1, 4 and 16 concurrent
clients (threads, each sending one-image requests back to back with its own seeds).

    python bench/serve_bench.py                      # starts a server in-process on the shipped model
    python bench/serve_bench.py --url http://127.0.0.1:7860   # against a running one

The in-process server uses ``python -m hart_jax.serve``'s defaults (one compiled batch size, 8; 50 ms
wait) unless told otherwise. Prints one JSON line per client count; docs/benchmarks.md has the
numbers.
"""

from __future__ import annotations

import argparse
import json
import platform
import threading
import time
import urllib.request

import numpy as np

PROMPTS = ["a red circle", "a green square", "a blue triangle", "a yellow circle", "a magenta square"]


def one(url: str, body: dict) -> float:
    """POST one request; its latency in seconds (raises on a non-200)."""
    req = urllib.request.Request(url + "/api/generate", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=600) as r:
        r.read()
        if r.status != 200:
            raise RuntimeError(f"status {r.status}")
    return time.perf_counter() - t0


def load(url: str, clients: int, per_client: int) -> dict:
    """``clients`` threads, ``per_client`` requests each: images/s and latency percentiles."""
    lat: list[float] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients)

    def client(c: int) -> None:
        barrier.wait()
        for i in range(per_client):
            s = one(url, {"prompt": PROMPTS[(c + i) % len(PROMPTS)], "seed": 1000 * c + i})
            with lock:
                lat.append(s)

    calls0 = stats(url)["pipeline_calls"]
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    st = stats(url)
    n = clients * per_client
    return {"clients": clients, "requests": n, "images_per_s": round(n / wall, 2),
            "p50_s": round(float(np.percentile(lat, 50)), 3), "p95_s": round(float(np.percentile(lat, 95)), 3),
            "pipeline_calls": st["pipeline_calls"] - calls0, "wall_s": round(wall, 2)}


def stats(url: str) -> dict:
    with urllib.request.urlopen(url + "/api/stats", timeout=60) as r:
        return json.loads(r.read())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=None, help="a running server (default: start one in-process)")
    p.add_argument("--clients", default="1,4,16", help="concurrent client counts (default: 1,4,16)")
    p.add_argument("--requests", type=int, default=128, help="requests per client count, split among the clients (default: 128)")
    p.add_argument("--batch-sizes", default=None, help="in-process server's compiled sizes, comma-separated "
                   "(default: the server's, 8)")
    p.add_argument("--max-wait-ms", type=float, default=50.0, help="in-process server's wait (default: 50)")
    args = p.parse_args()
    server = None
    url = args.url
    if url is None:
        from hart_jax.serve.app import Server, load_service

        t0 = time.perf_counter()
        service = load_service(batch_sizes=[int(b) for b in args.batch_sizes.split(",")] if args.batch_sizes else None,
                               max_wait_s=args.max_wait_ms / 1000, max_queued_images=256)
        server = Server(service).start()
        url = server.url
        print(json.dumps({"startup_s": round(time.perf_counter() - t0, 1),
                          "warmup_s": service.batcher.stats()["warmup_seconds"]}))
    import jax

    print(json.dumps({"jax": jax.__version__, "python": platform.python_version(), "backend": jax.default_backend(),
                      "cpus": __import__("os").cpu_count(), "batch_sizes": stats(url)["batch_sizes"],
                      "max_wait_s": stats(url)["max_wait_s"]}))
    one(url, {"prompt": PROMPTS[0], "seed": 0})  # first request out of the way
    for c in (int(x) for x in args.clients.split(",")):
        per = max(1, args.requests // c)
        print(json.dumps(load(url, c, per)), flush=True)
    if server is not None:
        server.stop()


if __name__ == "__main__":
    main()
