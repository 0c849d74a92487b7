"""make bench rows for serve.py: a bounded load test on loopback, batching on vs off, torch vs ONNX Runtime.

Each configuration is a real `serve.py` process on 127.0.0.1; a pool of client threads sends real
Fashion-MNIST test images (PNG files) as multipart uploads, a fixed number of requests in all, and stops.
Figures: requests/s, p50/p95/p99 latency, errors. All four servers run in the same call, one after another.

    python -m bench.serve [--quick]
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from bench import THREADS
from bench.table import run_section

ROOT = Path(__file__).resolve().parents[1]

CONFIGS = {  # name: serve.py overrides
    "torch, batching on": ["serve.backend=torch", "serve.max_batch_size=16", "serve.batch_timeout=0.005"],
    "torch, batching off": ["serve.backend=torch", "serve.max_batch_size=1"],
    "onnx, batching on": ["serve.backend=onnx", "serve.max_batch_size=16", "serve.batch_timeout=0.005"],
    "onnx, batching off": ["serve.backend=onnx", "serve.max_batch_size=1"],
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_checkpoint(workdir: Path, quick: bool) -> Path:
    """simple_cnn on real Fashion-MNIST, trained briefly (latency does not depend on accuracy), and its ONNX
    export beside it."""
    from skuvision.config import compose_config
    from skuvision.tasks.export import export
    from skuvision.tasks.train import train

    run = workdir / "train"
    overrides = [
        "data=fashion_mnist",
        "model=simple_cnn",
        f"data.root={workdir / 'data'}",
        "data.num_workers=0",
        "trainer.accelerator=cpu",
        "trainer.max_epochs=1",
        f"trainer.limit_train_batches={10 if quick else 50}",
        "trainer.limit_val_batches=2",
        "trainer.limit_test_batches=2",
        "callbacks.progress_bar=null",
        "trainer.enable_model_summary=false",
        f"threads={THREADS}",
    ]
    train(compose_config("train", overrides, run))
    ckpt = sorted((run / "checkpoints").glob("best-*.ckpt"))[0]
    onnx = ckpt.parent / "model.onnx"
    export(compose_config("export", [f"ckpt_path={ckpt}", f"output={onnx}"], workdir / "export"))
    return ckpt


def query_images(workdir: Path, count: int) -> list[bytes]:
    """Real test images as PNG files' bytes."""
    from skuvision.data.fashion_mnist import DEBIAN_DIR, read_idx

    images = read_idx(Path(DEBIAN_DIR) / "t10k-images-idx3-ubyte.gz")[:count]
    folder = workdir / "queries"
    folder.mkdir(exist_ok=True)
    out = []
    for i, array in enumerate(images):
        path = folder / f"{i}.png"
        Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)
        out.append(path.read_bytes())
    return out


class Server:
    def __init__(self, ckpt: Path, overrides: list[str], workdir: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": str(THREADS)}
        self.log = open(workdir / f"server-{self.port}.log", "w")
        self.process = subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "serve.py"),
                f"ckpt_path={ckpt}",
                f"serve.port={self.port}",
                "serve.demo=false",
                "serve.log_level=warning",
                f"threads={THREADS}",
                *overrides,
            ],
            cwd=workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def __enter__(self) -> Server:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"serve.py exited with {self.process.returncode}; see {self.log.name}")
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"serve.py not healthy after 300 s; see {self.log.name}")

    def __exit__(self, *exc) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.log.close()


def load_test(url: str, bodies: list[bytes], requests: int, clients: int) -> dict:
    """`requests` uploads from `clients` threads at once; latency per request, errors counted."""
    latencies, errors = [], 0

    def one(i: int) -> tuple[float, bool]:
        start = time.perf_counter()
        try:
            response = client.post(url + "/predict", files={"file": ("q.png", bodies[i % len(bodies)])})
            ok = response.status_code == 200 and bool(response.json()["labels"])
        except httpx.HTTPError:
            ok = False
        return time.perf_counter() - start, ok

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    with httpx.Client(timeout=60, limits=limits) as client, ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, range(min(clients, requests))))  # warm-up, not counted
        start = time.perf_counter()
        for seconds, ok in pool.map(one, range(requests)):
            latencies.append(seconds)
            errors += not ok
        wall = time.perf_counter() - start
    q = np.percentile(np.array(latencies) * 1000, [50, 95, 99])
    return {"rps": requests / wall, "p50": q[0], "p95": q[1], "p99": q[2], "errors": errors, "n": requests}


def bench_rows(workdir: Path, quick: bool = False) -> tuple[list[tuple], list[str]]:
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    requests, clients = (120, 8) if quick else (2000, 16)
    ckpt = make_checkpoint(workdir, quick)
    bodies = query_images(workdir, 256)
    results = {}
    for name, overrides in CONFIGS.items():
        with Server(ckpt, overrides, workdir) as server:
            results[name] = load_test(server.url, bodies, requests, clients)

    def lat(r: dict) -> str:
        return f"{r['p50']:.1f} / {r['p95']:.1f} / {r['p99']:.1f} ms"

    rows = []
    for backend in ("torch", "onnx"):
        on, off = results[f"{backend}, batching on"], results[f"{backend}, batching off"]
        rows.append(
            (
                f"serve {backend}: requests/s, batching on ({clients} clients)",
                f"{on['rps']:.0f}",
                f"{off['rps']:.0f} (batching off)",
                f"{on['rps'] / off['rps']:.2f}x",
                "> 1x under concurrent load",
            )
        )
        rows.append(
            (
                f"serve {backend}: latency p50 / p95 / p99, batching on",
                lat(on),
                f"{lat(off)} (batching off)",
                f"{on['p95'] / off['p95']:.2f}x p95",
                "p95 within 2x of unbatched",
            )
        )
    torch_on, onnx_on = results["torch, batching on"], results["onnx, batching on"]
    rows.append(
        (
            "serve: requests/s, ONNX Runtime vs torch (batching on)",
            f"{onnx_on['rps']:.0f}",
            f"{torch_on['rps']:.0f} (torch)",
            f"{onnx_on['rps'] / torch_on['rps']:.2f}x",
            ">= 1x",
        )
    )
    errors = sum(r["errors"] for r in results.values())
    total = sum(r["n"] for r in results.values())
    rows.append(("serve: failed requests in the load tests", f"{errors} of {total}", "-", "-", "0"))
    notes = [
        f"serve.py load test: {requests} multipart uploads of real Fashion-MNIST test PNGs per "
        f"configuration from {clients} client threads on 127.0.0.1 (httpx), after {clients} warm-up "
        f"requests; one inference worker with {THREADS} threads, client and server on the same machine; "
        "latency is client-side, per request.",
        *(f"{name}: {lat(r)}, {r['rps']:.1f} req/s, {r['errors']} errors" for name, r in results.items()),
    ]
    return rows, notes


def main() -> None:
    run_section(bench_rows, __doc__.splitlines()[0], "fewer requests and clients")


if __name__ == "__main__":
    main()
