"""Fixtures of the server and browser tests (a plugin named in conftest.py, so the session ones are built
once for both): one small checkpoint, its ONNX export and catalogue index, predict.py's answers for a few
real image files, one headless browser, and, per test module, serve.py running as a user starts it (each
server with a temp folder of its own, so a test sees every file it writes there)."""

from __future__ import annotations

import csv
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from skuvision.tasks.embed import embed
from skuvision.tasks.export import export
from skuvision.tasks.predict import predict
from tests.helpers import ROOT, compose_cfg, train_on_folder
from tests.writers import write_image_folder

CLASSES = ("kettle", "phone", "shirt", "toaster")
STARTUP_SECONDS = 240


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def shop(tmp_path_factory) -> Path:
    """The catalogue: PNG and JPEG photos in class folders."""
    return write_image_folder(tmp_path_factory.mktemp("shop"), classes=CLASSES, per_class=12, size=40)


@pytest.fixture(scope="session")
def serve_checkpoint(tmp_path_factory, shop) -> Path:
    """A simple_cnn trained for a few steps at 32 px, with flip TTA (so both backends must apply it)."""
    return train_on_folder(shop, tmp_path_factory.mktemp("serve_train") / "run", epochs=2, tta="flip")


@pytest.fixture(scope="session")
def onnx_model(serve_checkpoint, tmp_path_factory) -> Path:
    """export.py's model.onnx beside the checkpoint, where serve.backend=onnx finds it."""
    out = serve_checkpoint.parent / "model.onnx"
    cfg = compose_cfg(
        "export",
        [f"ckpt_path={serve_checkpoint}", f"output={out}", "check_images=8", "batch_size=4"],
        tmp_path_factory.mktemp("export") / "run",
    )
    export(cfg)
    return out


@pytest.fixture(scope="session")
def catalogue_index(serve_checkpoint, tmp_path_factory) -> Path:
    """An embed.py run over the catalogue's train split, with its index/ folder."""
    run = tmp_path_factory.mktemp("embed") / "run"
    overrides = [
        f"ckpt_path={serve_checkpoint}",
        "split=train",
        "num_workers=0",
        "trainer.accelerator=cpu",
        "trainer.precision=32",
        "k=3",
    ]
    embed(compose_cfg("embed", overrides, run))
    assert (run / "index" / "index.faiss").is_file()
    return run


@pytest.fixture(scope="session")
def browser(tmp_path_factory):
    """One headless Chromium for every page test of the session (tests.browser)."""
    from tests.browser import chromium

    driver = chromium(tmp_path_factory.mktemp("chromium_profile"))
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="session")
def query_files(shop, tmp_path_factory) -> list[Path]:
    """Real image files (PNG and JPEG) outside the catalogue folder; the 160 px JPEGs are large enough to be
    decoded at a reduced DCT scale."""
    root = tmp_path_factory.mktemp("queries")
    write_image_folder(root / "small", classes=CLASSES, per_class=2, size=48)
    write_image_folder(root / "large", classes=CLASSES, per_class=2, size=160)
    return sorted(p for p in root.rglob("*.*"))


@pytest.fixture(scope="session")
def predicted_top1(serve_checkpoint, query_files, tmp_path_factory) -> dict[str, str]:
    """predict.py's top-1 label per file (float32, as the server computes)."""
    listing = tmp_path_factory.mktemp("predict") / "list.txt"
    listing.write_text("\n".join(str(p) for p in query_files) + "\n")
    overrides = [
        f"ckpt_path={serve_checkpoint}",
        f"input={listing}",
        "num_workers=0",
        "trainer.accelerator=cpu",
        "trainer.precision=32",
    ]
    out = predict(compose_cfg("predict", overrides, listing.parent / "run"))
    with open(out) as f:
        return {row["path"]: row["label_1"] for row in csv.DictReader(f)}


def processes_below(pid: int) -> set[tuple[int, str]]:
    """Every live descendant of `pid` as (pid, start time), from /proc (the start time tells a reused pid)."""
    parents: dict[int, list[tuple[int, str]]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = process_stat(int(entry.name))
            if fields and fields[0] != "Z":
                parents.setdefault(int(fields[1]), []).append((int(entry.name), fields[19]))
    found, todo = set(), [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.add(child)
            todo.append(child[0])
    return found


def process_stat(pid: int) -> list[str] | None:
    """/proc/<pid>/stat after the command name: state, ppid, ..., start time at [19]; None when gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rfind(")") + 2 :].split()


def still_running(processes: set[tuple[int, str]]) -> set[tuple[int, str]]:
    """Those not ended: a process that exited but was not reaped yet (a zombie) has ended."""
    running = set()
    for pid, start in processes:
        fields = process_stat(pid)
        if fields and fields[19] == start and fields[0] != "Z":
            running.add((pid, start))
    return running


def wait_ended(processes: set[tuple[int, str]], seconds: float) -> set[tuple[int, str]]:
    deadline = time.monotonic() + seconds
    while still_running(processes) and time.monotonic() < deadline:
        time.sleep(0.2)
    return still_running(processes)


class RunningServer:
    """serve.py (or demo.py) in its own process group, with its own temp folder (TMPDIR); stopped (SIGTERM,
    then SIGKILL) whatever the test did."""

    def __init__(
        self,
        overrides: list[str],
        cwd: Path,
        name: str,
        env: dict | None = None,
        script: str = "serve.py",
        ready_path: str = "/health",
    ):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = cwd / f"{name}.log"
        self.tmp = cwd / f"{name}-tmp"
        self.tmp.mkdir()
        self.ready_path = ready_path
        self.key = (env or {}).get("LIT_SERVER_API_KEY")
        env = {
            **os.environ,
            "SKUVISION_OFFLINE": "1",
            "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
            "TMPDIR": str(self.tmp),
            **(env or {}),
        }
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(
                [sys.executable, str(ROOT / script), f"serve.port={self.port}", "threads=1", *overrides],
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )

    def log_tail(self, chars: int = 3000) -> str:
        return self.log.read_text()[-chars:]

    def wait_healthy(self) -> None:
        deadline = time.monotonic() + STARTUP_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"serve.py exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                headers = {"X-API-Key": self.key} if self.key else {}
                if httpx.get(self.url + self.ready_path, headers=headers, timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"no 200 from {self.ready_path} within {STARTUP_SECONDS} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
        if self.process.poll() is None or self.process.returncode != 0:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)  # the group this test started
            except ProcessLookupError:
                pass
            self.process.wait(timeout=30)


def torch_server(
    serve_checkpoint, catalogue_index, cwd: Path, name: str = "torch", env=None
) -> RunningServer:
    """torch with the index, the demo page and light batching."""
    overrides = [
        f"ckpt_path={serve_checkpoint}",
        f"index={catalogue_index}",
        "k=3",
        "serve.max_batch_size=4",
        "serve.batch_timeout=0.05",
    ]
    return RunningServer(overrides, cwd, name, env=env)


def stop_all(running: dict) -> None:
    for server in running.values():  # all draining at once
        if server.process.poll() is None:
            server.process.send_signal(signal.SIGTERM)
    for server in running.values():
        server.stop()


@pytest.fixture(scope="module")
def servers(serve_checkpoint, onnx_model, catalogue_index, tmp_path_factory):
    """Both backends at once (they start in parallel): torch_server, and ONNX Runtime without the page,
    with a batch window long enough that concurrent requests share a batch."""
    cwd = tmp_path_factory.mktemp("serve_cwd")
    running = {
        "torch": torch_server(serve_checkpoint, catalogue_index, cwd),
        "onnx": RunningServer(
            [
                f"ckpt_path={serve_checkpoint}",
                "serve.backend=onnx",
                "serve.demo=false",
                "serve.max_batch_size=16",
                "serve.batch_timeout=0.5",
                "serve.max_upload_mb=1",
            ],
            cwd,
            "onnx",
        ),
    }
    try:
        for server in running.values():
            server.wait_healthy()
        yield running
    finally:
        stop_all(running)


@pytest.fixture(scope="module")
def demo_server(serve_checkpoint, catalogue_index, tmp_path_factory):
    server = torch_server(serve_checkpoint, catalogue_index, tmp_path_factory.mktemp("demo_cwd"))
    try:
        server.wait_healthy()
        yield server
    finally:
        server.stop()


API_KEY = "test-key-7f3a91c2"


@pytest.fixture(scope="module")
def keyed_server(serve_checkpoint, catalogue_index, tmp_path_factory):
    """torch_server with LIT_SERVER_API_KEY set."""
    cwd = tmp_path_factory.mktemp("keyed_cwd")
    server = torch_server(
        serve_checkpoint, catalogue_index, cwd, "keyed", env={"LIT_SERVER_API_KEY": API_KEY}
    )
    try:
        server.wait_healthy()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def demo_alone(serve_checkpoint, catalogue_index, tmp_path_factory):
    """demo.py: the page alone, the model in its process."""
    overrides = [f"ckpt_path={serve_checkpoint}", f"index={catalogue_index}", "k=3"]
    cwd = tmp_path_factory.mktemp("demo_alone_cwd")
    server = RunningServer(overrides, cwd, "demo_alone", script="demo.py", ready_path="/config")
    try:
        server.wait_healthy()
        yield server
    finally:
        server.stop()
