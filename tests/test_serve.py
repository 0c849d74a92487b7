"""serve.py as a user runs it: real image files over HTTP on 127.0.0.1 give predict.py's top-1 with both
backends; every bad upload gets its 4xx and a JSON reason and the server goes on; one bad image never fails
the batch it shares; SIGTERM finishes the request in flight; the demo's file routes serve nothing else."""

from __future__ import annotations

import io
import shutil
import signal
import threading
import time

import httpx
import pytest
from serving_fixtures import *  # noqa: F403  (the session fixtures)

from skuvision.errors import SkuvisionError
from skuvision.serving.predictor import model_card

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
    """Concurrent requests inside the ONNX server's 0.5 s batch window: the bad one gets its 400, the good
    ones their answers, computed in one batch with it."""
    url = servers["onnx"].url
    classes = httpx.get(url + "/info").json()["model"]["classes"]
    files = query_files[:6]
    bodies = [p.read_bytes() for p in files] + [b"GIF89a broken"]
    start = threading.Barrier(len(bodies))
    responses: list = [None] * len(bodies)

    def send(i):
        start.wait()
        responses[i] = client.post(url + "/predict", files={"file": ("x", io.BytesIO(bodies[i]))})

    with httpx.Client(timeout=60, limits=httpx.Limits(max_connections=len(bodies))) as client:
        threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert responses[-1].status_code == 400 and "image" in responses[-1].json()["detail"]
    answers = [
        assert_good_answer(r, predicted_top1[str(p)], classes) for r, p in zip(responses, files, strict=False)
    ]
    assert max(a["batch"] for a in answers) == len(bodies), [a["batch"] for a in answers]


def test_onnx_backend_without_an_export_says_what_to_run(serve_checkpoint, tmp_path):
    lonely = tmp_path / "elsewhere" / "checkpoints"
    lonely.mkdir(parents=True)
    shutil.copy(serve_checkpoint, lonely / "best.ckpt")
    with pytest.raises(SkuvisionError, match="no model.onnx .* export.py"):
        model_card(str(lonely / "best.ckpt"), "onnx")
    with pytest.raises(SkuvisionError, match="serve.backend=tensorrt"):
        model_card(str(lonely / "best.ckpt"), "tensorrt")


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
