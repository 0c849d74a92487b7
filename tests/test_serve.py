"""serve.py as a user runs it: real image files over HTTP on 127.0.0.1 give predict.py's top-1 with both
backends; every bad upload gets its 4xx and a JSON reason and the server goes on; one bad image never fails
the batch it shares; SIGTERM finishes the request in flight; the demo's file routes serve nothing else."""

from __future__ import annotations

import base64
import http.client
import io
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from PIL import Image

from skuvision.errors import SkuvisionError
from skuvision.index import CatalogueIndex
from skuvision.serving.predictor import model_card
from skuvision.tasks.serve import prepared
from tests.helpers import ROOT, compose_cfg
from tests.serving_fixtures import processes_below, wait_ended

# serve.py and demo.py processes as a user starts them, each loading a model.
pytestmark = pytest.mark.slow

BACKENDS = ("torch", "onnx")


def post_file(url: str, path, raw: bool = False) -> httpx.Response:
    data = path.read_bytes()
    if raw:
        return httpx.post(url + "/predict", content=data, headers={"content-type": "image/png"}, timeout=60)
    return httpx.post(url + "/predict", files={"file": (path.name, data)}, timeout=60)


def assert_good_answer(response: httpx.Response, expected_top1: str, classes: list[str]) -> dict:
    assert response.status_code == 200, response.text
    answer = response.json()
    probs = [item["prob"] for item in answer["labels"]]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-5
    assert {item["label"] for item in answer["labels"]} <= set(classes)
    assert answer["labels"][0]["label"] == expected_top1
    assert len(answer["sha256"]) == 12 and answer["model"] == "simple_cnn"
    return answer


def test_health_and_info(servers, serve_checkpoint):
    for backend in BACKENDS:
        url = servers[backend].url
        assert httpx.get(url + "/health").status_code == 200
        info = httpx.get(url + "/info").json()["model"]
        assert info["backend"] == backend
        assert info["classes"] == ["kettle", "phone", "shirt", "toaster"]
        assert info["name"] == "simple_cnn" and info["checkpoint"] == serve_checkpoint.name
        assert info["tta"] == "flip"


@pytest.mark.parametrize("backend", BACKENDS)
def test_top1_equals_predict_py(servers, query_files, predicted_top1, backend):
    url = servers[backend].url
    classes = httpx.get(url + "/info").json()["model"]["classes"]
    assert len(set(predicted_top1.values())) > 1, "the test model predicts one class only"
    for i, path in enumerate(query_files):
        response = post_file(url, path, raw=i % 2 == 1)  # multipart and raw bodies
        assert_good_answer(response, predicted_top1[str(path)], classes)


def bad_requests(good_png: bytes, limit_mb: int) -> dict[str, tuple[dict, int]]:
    too_big = b"\x89PNG" + b"\0" * (limit_mb * 1024 * 1024 + 10)
    return {
        "text file": ({"files": {"file": ("notes.png", b"this is not an image")}}, 400),
        "truncated png": ({"files": {"file": ("cut.png", good_png[: len(good_png) // 2])}}, 400),
        "empty raw body": ({"content": b"", "headers": {"content-type": "image/png"}}, 400),
        "empty file field": ({"files": {"file": ("empty.png", b"")}}, 400),
        "form without a file field": ({"files": {"photo": ("a.png", good_png)}}, 400),
        "json body": ({"json": {"image": "a.png"}}, 415),
        "text body": ({"content": b"hello", "headers": {"content-type": "text/plain"}}, 415),
        "too large, declared": ({"content": too_big, "headers": {"content-type": "image/png"}}, 413),
        "too large, streamed without a length": (
            {"content": iter([too_big[:1000], too_big[1000:]]), "headers": {"content-type": "image/png"}},
            413,
        ),
        "too large multipart": ({"files": {"file": ("big.png", too_big)}}, 413),
    }


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_inputs_get_4xx_json_and_the_server_goes_on(
    servers, query_files, predicted_top1, tmp_path, backend
):
    url = servers[backend].url
    info = httpx.get(url + "/info").json()
    limit_mb = info["server"]["max_payload_size"] // (1024 * 1024)
    good = query_files[0]
    png = next(p for p in query_files if p.suffix == ".png").read_bytes()
    for name, (request, status) in bad_requests(png, limit_mb).items():
        response = httpx.post(url + "/predict", timeout=60, **request)
        assert response.status_code == status, f"{name}: {response.status_code} {response.text}"
        detail = response.json()["detail"]
        assert isinstance(detail, str) and detail, name
        answer = post_file(url, good)  # still serving, and still right
        assert_good_answer(answer, predicted_top1[str(good)], info["model"]["classes"])
    assert "image" in httpx.post(url + "/predict", content=b"hello").json()["detail"]


def test_one_bad_image_does_not_fail_its_batch(servers, query_files, predicted_top1):
    """The bad upload first, good ones right behind it inside the ONNX server's 0.5 s batch window: the bad
    one gets its 400, the good ones their answers, one or more computed in the same batch as the bad one."""
    url = servers["onnx"].url
    classes = httpx.get(url + "/info").json()["model"]["classes"]
    files = query_files[:6]
    bodies = [b"GIF89a broken"] + [p.read_bytes() for p in files]
    responses: list = [None] * len(bodies)

    def send(i):
        responses[i] = client.post(url + "/predict", files={"file": ("x", io.BytesIO(bodies[i]))})

    with httpx.Client(timeout=60, limits=httpx.Limits(max_connections=len(bodies))) as client:
        threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
        threads[0].start()
        time.sleep(0.05)
        for t in threads[1:]:
            t.start()
        for t in threads:
            t.join()
    assert responses[0].status_code == 400 and "image" in responses[0].json()["detail"]
    answers = [
        assert_good_answer(r, predicted_top1[str(p)], classes)
        for r, p in zip(responses[1:], files, strict=True)
    ]
    # A batch of b requests that were all good gives b answers saying b; fewer means a bad one was in it.
    sizes = Counter(a["batch"] for a in answers)
    assert any(count % size for size, count in sizes.items()), sizes


def test_onnx_backend_without_an_export_says_what_to_run(serve_checkpoint, tmp_path):
    lonely = tmp_path / "elsewhere" / "checkpoints"
    lonely.mkdir(parents=True)
    shutil.copy(serve_checkpoint, lonely / "best.ckpt")
    with pytest.raises(SkuvisionError, match="no model.onnx .* export.py"):
        model_card(str(lonely / "best.ckpt"), "onnx")
    with pytest.raises(SkuvisionError, match="serve.backend=tensorrt"):
        model_card(str(lonely / "best.ckpt"), "tensorrt")


def test_similar_items_come_from_the_index(servers, catalogue_index, shop):
    """A catalogue photo sent as a query finds itself first (cosine 1), with its path relative to the
    catalogue's folder and its label."""
    url = servers["torch"].url
    info = httpx.get(url + "/info").json()["model"]
    index = CatalogueIndex.load(catalogue_index / "index")
    assert info["index"]["items"] == len(index.items) and info["k"] == 3
    query = Path(index.items[-1])
    answer = post_file(url, query).json()
    similar = answer["similar"]
    assert len(similar) == 3
    assert similar[0]["path"] == str(query.relative_to(shop)) and similar[0]["label"] == query.parent.name
    assert similar[0]["score"] == pytest.approx(1.0, abs=1e-4)
    scores = [s["score"] for s in similar]
    assert scores == sorted(scores, reverse=True)
    assert "similar" not in post_file(servers["onnx"].url, query).json()  # no index there


def raw_get(port: int, path: str) -> tuple[int, bytes]:
    """GET with the path exactly as written (httpx would resolve `..` segments before sending)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_file_routes_serve_nothing_outside_the_catalogue(
    servers, serve_checkpoint, catalogue_index, tmp_path
):
    """Every route of the demo (and the API) that serves files, asked for the checkpoint, a file in a home
    folder, /etc/passwd, the index's own files, and paths with `..`: each is refused. The gallery's
    thumbnails of index items, made by the page itself, are served."""
    server = servers["torch"]
    home = tmp_path / "home" / "user"
    home.mkdir(parents=True)
    secret = home / ".netrc"
    secret.write_text("machine example.com login me password SECRET-TOKEN\n")
    targets = [
        str(serve_checkpoint),
        str(secret),
        "/etc/passwd",
        str(catalogue_index / "index" / "items.csv"),
        str(serve_checkpoint.parent / "model.onnx"),
        "/tmp/../etc/passwd",
        "../../../../../../etc/passwd",
        "%2e%2e/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
        "..%2F..%2F..%2F..%2F..%2F..%2Fetc%2Fpasswd",
        f"http://127.0.0.1:{server.port}/info",
    ]
    file_routes = [
        "/demo/file={}",
        "/demo/gradio_api/file={}",
        "/demo/file/{}",
        "/demo/gradio_api/file/{}",
        "/demo/gradio_api/proxy={}",
        "/demo/static/{}",
        "/demo/assets/{}",
        "/demo/svelte/{}",
        "/demo/gradio_api/custom_component/x/client/{}/y",
        "/{}",
        "/predict/{}",
    ]
    served = []
    for route in file_routes:
        for target in targets:
            path = route.format(target)
            status, body = raw_get(server.port, path)
            if not 400 <= status < 500 or b"SECRET-TOKEN" in body or b"root:" in body:
                served.append((path, status, body[:80]))
    assert not served, served

    from gradio_client import Client, handle_file

    # The page's own answer for a catalogue photo: its gallery thumbnails are fetched through the file route.
    query = Path(CatalogueIndex.load(catalogue_index / "index").items[0])
    client = Client(server.url + "/demo/", verbose=False, download_files=str(tmp_path / "downloads"))
    labels, gallery = client.predict(handle_file(str(query)), api_name="/classify")
    assert labels["label"] == post_file(server.url, query).json()["labels"][0]["label"]
    assert len(gallery) == 3
    for item in gallery:
        with Image.open(item["image"]) as thumbnail:
            assert thumbnail.format == "PNG" and min(thumbnail.size) >= 64


def test_config_mistakes_get_one_line_errors(serve_checkpoint, tmp_path):
    def prepare(*overrides):
        prepared(compose_cfg("serve", [f"ckpt_path={serve_checkpoint}", *overrides], tmp_path / "run"))

    with pytest.raises(SkuvisionError, match=r"serve.host=10.0.0.1: use 127.0.0.1"):
        prepare("serve.host=10.0.0.1")
    with pytest.raises(SkuvisionError, match=r"index=.*: no index/ folder there"):
        prepare(f"index={tmp_path}")
    with pytest.raises(SkuvisionError, match=r"tta='sideways'"):
        prepare("tta=sideways")


# --- What a client can reach: the demo's event API, server paths in answers, the API key, and how the
# server's processes end. Each test here attacks the server from outside, as a client would.

PASSWD_LINE = b"root:x:0:0"


def demo_event(client: httpx.Client, page: str, data: list, event: str = "classify") -> str:
    """One call of the page's `event` over Gradio's event API: the whole event stream as text."""
    started = client.post(f"{page}/gradio_api/call/{event}", json={"data": data}, timeout=60)
    assert started.status_code == 200, started.text
    return client.get(f"{page}/gradio_api/call/{event}/{started.json()['event_id']}", timeout=60).text


def file_data(path) -> dict:
    return {"path": str(path), "meta": {"_type": "gradio.FileData"}}


def files_holding(folder: Path, *needles: bytes) -> list[Path]:
    """Every file under `folder` that contains one of `needles`."""
    found = []
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            if any(needle in data for needle in needles):
                found.append(path)
    return found


def planted_files(server, name: str) -> dict[Path, bytes]:
    """Files someone else left in the server's temp folder, outside and inside its own private folder, but
    never uploaded through the page."""
    private = next(server.tmp.glob("skuvision-*"))
    planted = {}
    for path in (server.tmp / f"{name}.txt", private / f"{name}.txt", private / "examples" / f"{name}.txt"):
        secret = f"PLANTED-{name}-{path.parent.name}".encode()
        path.write_bytes(secret)
        planted[path] = secret
    return planted


def assert_attack_refused(
    client, server, page: str, serve_checkpoint, extra: tuple[bytes, ...] = (), event: str = "classify"
) -> None:
    """FileData payloads naming server files are each refused with an error event that names no server
    path, and no copy of any of them appears anywhere in the server's temp folder (Gradio's cache in it)."""
    planted = planted_files(server, f"p{server.port}{event}")
    targets = ["/etc/passwd", str(serve_checkpoint), "/proc/self/environ", *map(str, planted)]
    checkpoint = serve_checkpoint.read_bytes()
    for target in targets:
        stream = demo_event(client, page, [file_data(target)], event)
        assert "event: error" in stream and "event: complete" not in stream, (target, stream)
        for server_path in (target, str(server.tmp), str(serve_checkpoint.parent)):
            assert server_path not in stream, (target, stream)
    for variant in (  # the same file named other ways
        {"path": "/etc/../etc/passwd", "meta": {"_type": "gradio.FileData"}},
        {"path": "file:///etc/passwd", "meta": {"_type": "gradio.FileData"}},
        {"path": "/etc/passwd", "url": "file:///etc/passwd", "meta": {"_type": "gradio.FileData"}},
    ):
        stream = demo_event(client, page, [variant], event)
        assert "event: complete" not in stream, (variant, stream)
    copies = [
        p for p in files_holding(server.tmp, PASSWD_LINE, *planted.values(), *extra) if p not in planted
    ]
    copies += [p for p in server.tmp.rglob("*") if p.is_file() and p.read_bytes() == checkpoint]
    assert not copies, copies


def test_demo_event_api_copies_no_server_file(servers, serve_checkpoint, catalogue_index):
    """The mounted page, sent FileData naming /etc/passwd, the served checkpoint, the process environment and
    files planted in the server's temp folder: each refused before anything is copied, and the page still
    classifies an image uploaded through it."""
    server = servers["torch"]
    with httpx.Client(base_url=server.url) as client:
        assert_attack_refused(client, server, "/demo", serve_checkpoint, extra=(b"PYTHONUNBUFFERED=1",))

    from gradio_client import Client, handle_file

    query = Path(CatalogueIndex.load(catalogue_index / "index").items[0])
    page = Client(server.url + "/demo/", verbose=False, download_files=str(server.tmp / "downloads"))
    labels, _ = page.predict(handle_file(str(query)), api_name="/classify")
    assert labels["label"] == post_file(server.url, query).json()["labels"][0]["label"]
    # A cut PNG passes Gradio's own checks and is refused by the server: the page shows the server's reason.
    png = next(p for p in query.parent.parent.rglob("*.png")).read_bytes()
    cut = server.tmp / "cut.png"
    cut.write_bytes(png[: len(png) // 2])
    with pytest.raises(Exception, match="not a decodable image|not an image") as shown:
        page.predict(handle_file(str(cut)), api_name="/classify")
    assert str(server.tmp) not in str(shown.value)


def test_demo_alone_copies_no_server_file(demo_alone, serve_checkpoint):
    """demo.py alone, the same attack: refused, nothing copied, no server path in the error events."""
    with httpx.Client(base_url=demo_alone.url) as client:
        assert_attack_refused(client, demo_alone, "", serve_checkpoint, extra=(b"PYTHONUNBUFFERED=1",))


def strings_in(value) -> list[str]:
    if isinstance(value, dict):
        return [s for v in value.values() for s in strings_in(v)]
    if isinstance(value, list):
        return [s for v in value for s in strings_in(v)]
    return [value] if isinstance(value, str) else []


def test_answers_name_no_server_path(servers, catalogue_index, shop, serve_checkpoint):
    """/info and /predict (with similar items) carry no absolute path, and nothing of where the catalogue,
    the checkpoint or the run folders lie on the server."""
    server = servers["torch"]
    query = Path(CatalogueIndex.load(catalogue_index / "index").items[0])
    answers = [httpx.get(server.url + "/info").json(), post_file(server.url, query).json()]
    answers.append(httpx.get(servers["onnx"].url + "/info").json())
    assert answers[1]["similar"]
    server_folders = (str(shop), str(serve_checkpoint.parent), str(catalogue_index), str(Path.home()))
    leaks = [
        s for s in strings_in(answers) if s.startswith("/") or any(folder in s for folder in server_folders)
    ]
    assert not leaks, leaks


def test_api_docs_are_off_and_nothing_points_outside(servers):
    """FastAPI's /docs and /redoc load their scripts from a CDN: they, and the schema they read, are off."""
    url = servers["torch"].url
    for path in ("/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"):
        assert httpx.get(url + path).status_code == 404, path
    for path in ("/", "/info", "/demo/"):
        body = httpx.get(url + path, follow_redirects=True).text
        assert "cdn.jsdelivr.net" not in body and "unpkg.com" not in body, path


def test_api_key_guards_the_api_and_the_page(keyed_server, query_files, predicted_top1, serve_checkpoint):
    """With LIT_SERVER_API_KEY set: /predict, /info and /health refuse a missing or wrong key and answer the
    right one; the page and its event API refuse a visitor who has not logged in with the key, and classify
    for one who has; a logged-in visitor still gets no server file (the environment holds the key)."""
    server, key = keyed_server, keyed_server.key
    image = query_files[0]
    data = image.read_bytes()
    for route in ("/predict", "/info", "/health"):
        for headers in ({}, {"X-API-Key": "wrong"}, {"X-API-Key": key[:-1]}):
            if route == "/predict":
                response = httpx.post(server.url + route, files={"file": (image.name, data)}, headers=headers)
            else:
                response = httpx.get(server.url + route, headers=headers)
            assert response.status_code == 401, (route, headers, response.status_code)
    answer = httpx.post(
        server.url + "/predict", files={"file": (image.name, data)}, headers={"X-API-Key": key}
    )
    assert answer.status_code == 200 and answer.json()["labels"][0]["label"] == predicted_top1[str(image)]

    with httpx.Client(base_url=server.url) as visitor:  # no login
        for path in ("/demo/config", "/demo/gradio_api/info", f"/demo/gradio_api/file={image}"):
            assert visitor.get(path).status_code == 401, path
        refused = visitor.post("/demo/gradio_api/call/classify", json={"data": [file_data(image)]})
        assert refused.status_code == 401
        wrong = visitor.post("/demo/login", data={"username": "anyone", "password": "wrong"})
        assert wrong.status_code >= 400 and visitor.get("/demo/config").status_code == 401
        assert visitor.post("/demo/login", data={"username": "anyone", "password": key}).status_code == 200
        assert visitor.get("/demo/config").status_code == 200
        assert_attack_refused(visitor, server, "/demo", serve_checkpoint, extra=(key.encode(),))

    from gradio_client import Client, handle_file

    page = Client(
        server.url + "/demo/", auth=("anyone", key), verbose=False, download_files=str(server.tmp / "dl")
    )
    labels, gallery = page.predict(handle_file(str(image)), api_name="/classify")
    assert labels["label"] == predicted_top1[str(image)] and len(gallery) == 3


def running_processes_of(server) -> set:
    processes = processes_below(server.process.pid)
    assert len(processes) >= 2, "the server started no worker processes"  # an inference and an HTTP one
    return processes


def test_sigkill_of_the_server_process_ends_its_workers(keyed_server):
    """serve.py killed without a chance to drain (SIGKILL, the OOM killer): its inference worker, HTTP
    processes and queue manager, re-parented, end on their own; the port is free again. The keyed server,
    done with the test above, is the one killed (no server started for this test alone)."""
    server = keyed_server
    processes = running_processes_of(server)
    os.kill(server.process.pid, signal.SIGKILL)
    server.process.wait(timeout=10)
    left = wait_ended(processes, 20)
    assert not left, [Path(f"/proc/{pid}/cmdline").read_bytes()[:200] for pid, _ in left]
    with pytest.raises(httpx.TransportError):
        httpx.get(server.url + "/health", timeout=5)


def serve_py(*overrides: str, cwd: Path, script: str = "serve.py") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / script), *overrides],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "SKUVISION_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
    )


def assert_one_line_error(run: subprocess.CompletedProcess, pattern: str) -> None:
    assert run.returncode == 2, run.stderr[-3000:]
    lines = run.stderr.strip().splitlines()
    assert lines and re.search(pattern, lines[-1]), run.stderr[-3000:]
    assert "Traceback" not in run.stderr, run.stderr[-3000:]


def test_serve_mistakes_get_one_line_errors(serve_checkpoint, tmp_path):
    """Settings a user gets wrong, a port someone else holds, and no checkpoint at all: one line each."""

    def prepare(*overrides):
        prepared(compose_cfg("serve", [f"ckpt_path={serve_checkpoint}", *overrides], tmp_path / "run"))

    mistakes = {
        "serve.port=80": r"serve.port=80: use a whole number from 1024 to 65535",
        "serve.port=abc": r"serve.port=abc: use a whole number",
        "serve.max_batch_size=0": r"serve.max_batch_size=0: use a whole number 1 or more",
        "serve.batch_timeout=-1": r"serve.batch_timeout=-1: use a number 0 or more",
        "serve.timeout=0": r"serve.timeout=0: use a number above 0",
        "serve.max_upload_mb=0": r"serve.max_upload_mb=0: use a number above 0",
        "serve.workers_per_device=0": r"serve.workers_per_device=0",
        "serve.log_level=loud": r"serve.log_level=loud: use one of critical",
        "serve.accelerator=tpu": r"serve.accelerator=tpu: use one of auto, cpu, cuda",
        "top_k=0": r"top_k=0: use a whole number 1 or more",
        "k=-2": r"k=-2",
        "threads=0": r"threads=0: use a whole number 1 or more or null",
    }
    for override, message in mistakes.items():
        with pytest.raises(SkuvisionError, match=message):
            prepare(override)

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        overrides = (f"ckpt_path={serve_checkpoint}", f"serve.port={port}", "serve.demo=false")
        # The three commands at once: each is mostly an interpreter importing torch, two cores share them.
        with ThreadPoolExecutor(3) as pool:
            run = pool.submit(serve_py, *overrides, cwd=tmp_path)
            alone = pool.submit(serve_py, *overrides, cwd=tmp_path, script="demo.py")
            bare = pool.submit(serve_py, cwd=tmp_path)
            run, alone, bare = run.result(), alone.result(), bare.result()
    assert_one_line_error(run, rf"error: serve.port={port}: 127.0.0.1:{port} is taken")
    assert_one_line_error(alone, rf"error: serve.port={port}: 127.0.0.1:{port} is taken")
    assert_one_line_error(bare, r"error: ckpt_path is missing")


def test_huge_png_is_refused_fast_and_phone_photos_are_seen_upright(servers, query_files, tmp_path):
    """A 13000 x 13000 px PNG (0.5 MB, under Pillow's bomb limit; decoding it took 6 s and 2.4 GB in a
    worker) gets its 413 from its header, and the next request is served; a phone JPEG stored turned with
    Orientation=6 gets its upright twin's answer."""
    import numpy as np

    from tests.writers import pattern_images, write_huge_png, write_oriented_jpeg

    url = servers["torch"].url
    huge = write_huge_png(tmp_path / "huge.png")
    started = time.monotonic()
    response = post_file(url, huge)
    assert response.status_code == 413, response.text
    assert time.monotonic() - started < 3  # answered from the header
    assert "13000x13000 px image decodes to 169,000,000 pixels" in response.json()["detail"]
    assert "pixel budget of 16,777,216" in response.json()["detail"]
    assert post_file(url, query_files[0]).status_code == 200

    upright = Image.fromarray(pattern_images(np.array([1]), 40, 3, seed=5)[0]).resize((200, 160))
    upright.save(tmp_path / "upright.jpg", quality=95)
    oriented = write_oriented_jpeg(tmp_path / "oriented.jpg", upright, 6)
    with Image.open(oriented) as stored:
        stored.convert("RGB").save(tmp_path / "sideways.jpg", quality=95)  # the same pixels, no tag
    probs = {}
    for name in ("upright", "oriented", "sideways"):
        response = post_file(url, tmp_path / f"{name}.jpg")
        assert response.status_code == 200, response.text
        probs[name] = {item["label"]: item["prob"] for item in response.json()["labels"]}
    assert max(abs(probs["oriented"][k] - p) for k, p in probs["upright"].items()) < 0.02
    assert max(abs(probs["sideways"][k] - p) for k, p in probs["upright"].items()) > 0.1


def test_explain_true_adds_an_overlay_and_bad_values_get_400(
    servers, query_files, predicted_top1, serve_checkpoint
):
    """explain=true (query or form field): the Grad-CAM overlay of the top label as a base64 PNG at the
    model's input size; a bad value is a 400 naming it; the ONNX backend refuses it per request; the server
    goes on answering; the page's explain event refuses file payloads naming server files."""
    url = servers["torch"].url
    classes = httpx.get(url + "/info").json()["model"]["classes"]
    size = model_card(str(serve_checkpoint)).input_config["input_size"][-1]
    good = query_files[0]
    files = {"file": (good.name, good.read_bytes())}
    for request in ({"params": {"explain": "true"}}, {"data": {"explain": "1"}}):
        answer = assert_good_answer(
            httpx.post(url + "/predict", files=files, timeout=60, **request),
            predicted_top1[str(good)],
            classes,
        )
        shown = answer["explanation"]
        assert (shown["method"], shown["label"]) == ("gradcam", answer["labels"][0]["label"])
        picture = Image.open(io.BytesIO(base64.b64decode(shown["overlay_png"])))
        assert (picture.format, picture.mode, picture.size) == ("PNG", "RGB", (size, size))
    assert "explanation" not in post_file(url, good).json()
    for bad in ("maybe", "2", "true' OR 1=1", "x" * 5000):
        response = httpx.post(url + "/predict", params={"explain": bad}, files=files, timeout=60)
        assert response.status_code == 400 and "explain" in response.json()["detail"], response.text
        assert len(response.json()["detail"]) < 120
        assert_good_answer(post_file(url, good), predicted_top1[str(good)], classes)
    onnx = servers["onnx"].url
    response = httpx.post(onnx + "/predict", params={"explain": "true"}, files=files, timeout=60)
    assert response.status_code == 400 and "torch backend" in response.json()["detail"]
    assert_good_answer(post_file(onnx, good), predicted_top1[str(good)], classes)
    with httpx.Client(base_url=url) as client:
        assert_attack_refused(client, servers["torch"], "/demo", serve_checkpoint, event="explain")
    from gradio_client import Client, handle_file

    page = Client(url + "/demo/", verbose=False, download_files=str(servers["torch"].tmp / "downloads"))
    shown = Image.open(page.predict(handle_file(str(good)), api_name="/explain"))
    assert shown.size == (size, size)  # the page's button shows the overlay the API answers


def test_sigterm_ends_every_server_process_promptly_with_a_page_open(servers):
    """Second to last in this module: it stops the shared torch server, after every test that uses it.
    SIGTERM while a demo page is open (its heartbeat stream held) and nothing is in flight: serve.py and
    every process it started are gone within a few seconds, exit status 0."""
    server = servers["torch"]
    processes = running_processes_of(server)
    lines: list[str] = []

    def open_page() -> None:
        try:
            with httpx.stream("GET", server.url + "/demo/gradio_api/heartbeat/page", timeout=120) as beat:
                lines.extend(beat.iter_lines())
        except httpx.TransportError:
            pass

    page = threading.Thread(target=open_page, daemon=True)
    page.start()
    time.sleep(1)
    assert page.is_alive()  # the page's stream is open
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(timeout=20) == 0, server.log_tail()
    assert not wait_ended(processes, 10), server.log_tail()
    page.join(10)
    assert not page.is_alive()


def test_sigterm_finishes_the_request_in_flight(servers, query_files, predicted_top1):
    """Last in this module: it stops the ONNX server. SIGTERM arrives while a slow client is still sending
    its upload; the request is answered, then the process exits 0."""
    server = servers["onnx"]
    data = query_files[0].read_bytes()
    result, sending = {}, threading.Event()

    def slow_body():
        yield data[:64]
        sending.set()
        time.sleep(1.5)  # SIGTERM arrives now
        yield data[64:]

    def send():
        headers = {"content-type": "image/png"}
        result["response"] = httpx.post(
            server.url + "/predict", content=slow_body(), headers=headers, timeout=60
        )

    thread = threading.Thread(target=send)
    thread.start()
    assert sending.wait(30)
    time.sleep(0.2)
    server.process.send_signal(signal.SIGTERM)
    thread.join(60)
    assert "response" in result, "the request in flight got no answer"
    assert result["response"].status_code == 200, result["response"].text
    assert result["response"].json()["labels"][0]["label"] == predicted_top1[str(query_files[0])]
    assert server.process.wait(timeout=60) == 0, server.log_tail()
    with pytest.raises(httpx.TransportError):
        httpx.get(server.url + "/health", timeout=5)
