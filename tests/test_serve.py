"""serve.py as a user runs it: real image files over HTTP on 127.0.0.1 give predict.py's top-1 with both
backends; every bad upload gets its 4xx and a JSON reason and the server goes on; one bad image never fails
the batch it shares; SIGTERM finishes the request in flight; the demo's file routes serve nothing else."""

from __future__ import annotations

import http.client
import io
import shutil
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from conftest import compose_cfg
from PIL import Image

from skuvision.errors import SkuvisionError
from skuvision.index import CatalogueIndex
from skuvision.serving.predictor import model_card
from skuvision.tasks.serve import prepared

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
        assert info["name"] == "simple_cnn" and info["checkpoint"] == str(serve_checkpoint)
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


def test_similar_items_come_from_the_index(servers, catalogue_index):
    """A catalogue photo sent as a query finds itself first (cosine 1), with its path and label."""
    url = servers["torch"].url
    info = httpx.get(url + "/info").json()["model"]
    index = CatalogueIndex.load(catalogue_index / "index")
    assert info["index"]["items"] == len(index.items) and info["k"] == 3
    query = Path(index.items[-1])
    answer = post_file(url, query).json()
    similar = answer["similar"]
    assert len(similar) == 3
    assert similar[0]["path"] == str(query) and similar[0]["label"] == query.parent.name
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


def test_huge_png_is_refused_fast_and_phone_photos_are_seen_upright(servers, query_files, tmp_path):
    """A 13000 x 13000 px PNG (0.5 MB, under Pillow's bomb limit; decoding it took 6 s and 2.4 GB in a
    worker) gets its 413 from its header, and the next request is served; a phone JPEG stored turned with
    Orientation=6 gets its upright twin's answer."""
    import numpy as np
    from writers import pattern_images, write_huge_png, write_oriented_jpeg

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
