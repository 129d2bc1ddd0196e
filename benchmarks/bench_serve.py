"""``medsegx serve``: seconds from a segment request to its response, over HTTP on loopback.

A: one slice whose embedding is cached (a redrawn box: the prompt decoder only);
B: the same request with the cache emptied first (image encoder + decoder), the baseline.
Alternating A/B, median of ``--repeats`` each, one torch thread (set OMP_NUM_THREADS=1 too).

    OMP_NUM_THREADS=1 python benchmarks/bench_serve.py --model_type lite
"""
from __future__ import annotations

import argparse
import platform
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_type", default="lite")
    parser.add_argument("--image", default=str(REPO.parent / "shared" / "data" / "volumes" / "ct_abdomen_small.nii.gz"))
    parser.add_argument("--z", type=int, default=15)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    import httpx
    import torch
    import uvicorn

    from medsegx.inference.runner import SliceRunner, native_bf16
    from medsegx.model import build_model
    from medsegx.serve.app import create_app
    from medsegx.serve.cache import CachedModel, EmbeddingCache
    from medsegx.serve.sessions import SessionStore

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    (work / "root").mkdir()
    shutil.copy(args.image, work / "root" / "image.nii.gz")
    cache = EmbeddingCache(256 << 20)
    runner = SliceRunner(CachedModel(build_model(args.model_type), cache), "cpu")
    store = SessionStore(work / "root", work / "out")
    app = create_app(runner, store, cache, {"model_type": args.model_type})
    sock = socket.create_server(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        with httpx.Client(base_url=url, timeout=300) as client:
            image = client.post("/api/images", json={"path": "image.nii.gz"}).json()["id"]
            _, Y, X = client.get(f"/api/images/{image}").json()["shape"]

            def request(k: int) -> float:
                box = [X // 4 + k % 3, Y // 4, 3 * X // 4, 3 * Y // 4]
                t0 = time.perf_counter()
                r = client.post(f"/api/images/{image}/segment", json={"box": box, "z": args.z, "modality": "CT",
                                                                       "task": "Liver"})
                seconds = time.perf_counter() - t0
                r.raise_for_status()
                return seconds

            request(0)  # warm-up (and the first embedding)
            cached, uncached = [], []
            for k in range(args.repeats):
                cached.append(request(k + 1))
                cache.clear()
                uncached.append(request(k + 1))
            stats = cache.stats()
    finally:
        server.should_exit = True
        thread.join(10)
        store.close_all()
        shutil.rmtree(work, ignore_errors=True)
    a, b = statistics.median(cached), statistics.median(uncached)
    load = " ".join(f"{v:.2f}" for v in __import__("os").getloadavg())
    print(f"{cpu_name()}, native bf16: {native_bf16()}, torch {torch.__version__}, 1 thread, load {load}")
    print(f"{args.model_type}: segment request -> response, median of {args.repeats} (alternating):")
    print(f"  cached embedding   {a:.3f} s  (all: {', '.join(f'{v:.3f}' for v in cached)})")
    print(f"  uncached (encoder) {b:.3f} s  (all: {', '.join(f'{v:.3f}' for v in uncached)})")
    print(f"  ratio uncached / cached: x{b / a:.1f}; cache hits {stats['hits']}, misses {stats['misses']}")


if __name__ == "__main__":
    main()
