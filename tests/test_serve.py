"""`crasmra serve`: the HTTP API end to end with the tiny checkpoint, and its safety limits."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import socket
import struct
import sys
import threading
import time
import urllib.error
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib import request as urlrequest

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi", reason="crasmra[serve] is not installed")
pytest.importorskip("httpx", reason="fastapi's TestClient needs httpx")

from fastapi.testclient import TestClient

from attention_helpers import SIZE, attention_network, library_gradcam, registered_attention
from crasmra import serve
from crasmra.cli import build_parser, main
from crasmra.errors import MissingExtraError
from crasmra.inference import load_model

BASE = "http://127.0.0.1"


@pytest.fixture(scope="module")
def model(tiny_checkpoint: Path) -> Any:
    return load_model(tiny_checkpoint)


@pytest.fixture(scope="module")
def app(tiny_checkpoint: Path) -> Any:
    """The app as `crasmra serve` builds it from the checkpoint (examples included)."""
    return serve.create_app(tiny_checkpoint)


@pytest.fixture(scope="module")
def client(app: Any) -> Iterator[TestClient]:
    with TestClient(app, base_url=BASE, raise_server_exceptions=False) as c:
        yield c


@pytest.fixture(scope="module")
def small_app(model: Any) -> Any:
    """Limits small enough to cross cheaply: 50 KiB files, 10 000 pixels."""
    return serve.create_app(model, max_upload_mb=50 / 1024, max_pixels=10_000, examples=[])


@pytest.fixture(scope="module")
def small_client(small_app: Any) -> Iterator[TestClient]:
    with TestClient(small_app, base_url=BASE, raise_server_exceptions=False) as c:
        yield c


def png_bytes(size: tuple[int, int], seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(arr).save(buffer, format="PNG")
    return buffer.getvalue()


def decode_data_url(url: str) -> Image.Image:
    assert url.startswith("data:image/jpeg;base64,")
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))


def post_image(client: TestClient, data: bytes, name: str = "x.png") -> Any:
    return client.post("/api/predict", files={"image": (name, data, "image/png")})


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width`` x ``height`` but which carries no pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))


def post_raw(base: str, data: bytes) -> tuple[int, Any, dict[str, Any]]:
    """POST an image to a running server: status, headers (case-insensitive) and JSON body."""
    body, boundary = multipart(data)
    req = urlrequest.Request(f"{base}/api/predict", data=body, method="POST", headers={
        "Content-Type": f"multipart/form-data; boundary={boundary}"})
    try:
        with urlrequest.urlopen(req, timeout=60) as response:
            return response.status, response.headers, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, err.headers, json.loads(err.read())


def raw_exchange(server: Any, request: bytes, timeout: float = 10.0) -> tuple[str, bool]:
    """Send raw bytes to a server; return what came back and whether it closed the connection."""
    with socket.create_connection((server.host, server.port), timeout=timeout) as sock:
        sock.sendall(request)
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
            closed = True
        except TimeoutError:
            closed = False
    return answer.decode("latin-1"), closed


def wait_for(condition: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


# ---------------------------------------------------------------------------------------------
# the page and the read-only routes
# ---------------------------------------------------------------------------------------------
def test_page_is_self_contained_and_locked_down(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="file"' in page.text and 'type="file"' in page.text
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp
    assert page.headers["x-content-type-options"] == "nosniff"
    # Works offline: the page and its assets load nothing from elsewhere.
    for path in ("/", "/static/app.js", "/static/style.css"):
        text = client.get(path).text
        assert "http://" not in text and "https://" not in text, path
    assert client.get("/static/../serve.py").status_code == 404
    assert client.get("/static/nothing.js").json() == {"error": "Not Found"}
    # No generated docs pages (they would pull scripts from a CDN).
    assert client.get("/docs").status_code == 404


def test_info_describes_model_and_limits(client: TestClient, model: Any) -> None:
    info = client.get("/api/info").json()
    assert info["classes"] == model.classes
    assert info["stage_names"] == list(model.stage_names)
    assert info["backbone"] == "resnet10t" and info["checkpoint"] == "best.ckpt"
    assert info["top_k"] == 4  # min(5, K)
    assert info["max_upload_bytes"] == 20 * 2**20
    assert info["max_pixels"] == serve.DEFAULT_MAX_PIXELS


def test_examples_come_from_the_checkpoints_dataset(client: TestClient, model: Any) -> None:
    examples = client.get("/api/examples").json()
    # The synthetic set is regenerated: one test image per class.
    assert [e["label"] for e in examples] == model.classes
    image = client.get(examples[0]["url"])
    assert image.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(image.content)).size == (64, 64)
    assert client.get("/api/examples/99").status_code == 404


def test_no_examples_without_a_dataset(tmp_path: Path, model: Any) -> None:
    from crasmra.checkpoint import build_metadata, save_safetensors

    meta = build_metadata(model.config, model.classes, model.preprocessing.as_config(),
                          model.data_config)
    export = save_safetensors(tmp_path / "m.safetensors", model.state_dict(), meta)
    assert serve.load_examples(export) == []


# ---------------------------------------------------------------------------------------------
# predictions
# ---------------------------------------------------------------------------------------------
def test_predict_returns_top_k_and_stage_overlays(client: TestClient, model: Any) -> None:
    example = client.get("/api/examples/2").content
    response = post_image(client, example)
    assert response.status_code == 200, response.text
    result = response.json()
    x = model.transform(Image.open(io.BytesIO(example)).convert("RGB")).unsqueeze(0)
    with torch.inference_mode():
        probs = model(x).probs[0]
    ranked = torch.argsort(probs, descending=True).tolist()
    assert [r["index"] for r in result["top_k"]] == ranked
    assert [r["label"] for r in result["top_k"]] == [model.classes[i] for i in ranked]
    assert [r["rank"] for r in result["top_k"]] == [1, 2, 3, 4]
    assert np.allclose([r["probability"] for r in result["top_k"]], probs[ranked], atol=1e-6)
    assert [s["name"] for s in result["stages"]] == list(model.stage_names)
    for stage in result["stages"]:
        for key in ("gradcam", "activation"):
            overlay = decode_data_url(stage[key])
            assert overlay.size == (64, 64) and overlay.mode == "RGB"
    assert decode_data_url(result["input"]).size == (64, 64)
    assert result["image_size"] == [64, 64]
    assert response.headers["cache-control"] == "no-store"


def test_gradcam_equals_pytorch_grad_cam(model: Any) -> None:
    pytest.importorskip("pytorch_grad_cam", reason="grad-cam is not installed")
    from crasmra.viz import activation_maps

    x = model.transform(Image.open(io.BytesIO(png_bytes((80, 64), seed=3)))).unsqueeze(0)
    result = serve.explain_tensor(model, x)
    reference = library_gradcam(model, x, result.class_index)
    for ours, theirs in zip(result.gradcam, reference, strict=True):
        assert ours.shape == theirs.shape == (64, 64)
        np.testing.assert_allclose(ours, theirs, atol=1e-4)
    with torch.inference_mode():
        output = model(x)
    assert torch.allclose(result.probs, output.probs[0], atol=1e-6)
    for ours, theirs in zip(result.activation, activation_maps(output.features, (64, 64)),
                            strict=True):
        np.testing.assert_allclose(ours, theirs, atol=1e-5)
    # Grad-CAM's backward leaves no gradients on the shared model.
    assert all(p.grad is None for p in model.parameters())


def test_explain_without_the_viz_extra_names_the_install_command(
    model: Any, tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    monkeypatch.setitem(sys.modules, "pytorch_grad_cam", None)
    with pytest.raises(MissingExtraError, match=r'pip install "crasmra\[viz\]"'):
        serve.explain_tensor(model, torch.zeros(1, 3, 64, 64))
    # The server computes a Grad-CAM to warm up, so it refuses to start, in one line.
    served = []
    monkeypatch.setattr(serve, "run_server", lambda *a, **k: served.append(a))
    assert main(["serve", str(tiny_checkpoint), "--port", "0"]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert "Traceback" not in err and len(errors) == 1
    assert errors[0].startswith("crasmra: error: Grad-CAM needs the grad-cam package")
    assert 'pip install "crasmra[viz]"' in errors[0]
    assert not served


def test_plain_model_shows_the_last_stage(plain_checkpoint: Path) -> None:
    from crasmra.viz import gradcam_maps

    plain = load_model(plain_checkpoint)
    predictor = serve.Predictor(plain)
    assert predictor.info()["variant"] == "plain"
    assert predictor.info()["stage_names"] == ["stage5"]
    result = predictor.predict_bytes(png_bytes((80, 64), seed=3))
    assert [s["name"] for s in result["stages"]] == ["stage5"]
    assert decode_data_url(result["stages"][0]["gradcam"]).size == (64, 64)

    x = plain.transform(Image.open(io.BytesIO(png_bytes((80, 64), seed=3)))).unsqueeze(0)
    explanation = serve.explain_tensor(plain, x)
    with torch.inference_mode():
        probs = plain(x).probs[0]
    assert torch.allclose(explanation.probs, probs, atol=1e-6)
    (ours,) = explanation.gradcam
    (reference,) = gradcam_maps(plain, x, explanation.class_index)
    np.testing.assert_allclose(ours, reference, atol=1e-5)
    assert all(p.grad is None for p in plain.parameters())


@pytest.mark.parametrize("attention", registered_attention())
def test_every_registered_attention_module_is_served(attention: str) -> None:
    net = attention_network(attention)
    predictor = serve.Predictor(net)
    result = predictor.predict_bytes(png_bytes((80, 64), seed=1))
    assert [s["name"] for s in result["stages"]] == list(net.stage_names)
    for stage in result["stages"]:
        for key in ("gradcam", "activation"):
            assert decode_data_url(stage[key]).size == (SIZE, SIZE)
    assert all(p.grad is None for p in net.parameters())


def test_concurrent_users_get_their_own_results(app: Any) -> None:
    images = [png_bytes(size, seed) for seed, size in
              enumerate([(64, 64), (80, 64), (96, 72), (64, 90)])]

    def ask(base: str, data: bytes) -> dict[str, Any]:
        body, boundary = multipart(data)
        req = urlrequest.Request(f"{base}/api/predict", data=body, method="POST", headers={
            "Content-Type": f"multipart/form-data; boundary={boundary}"})
        with urlrequest.urlopen(req, timeout=60) as response:
            return json.loads(response.read())

    with serve.ServerThread(app) as server:
        alone = [ask(server.url, data) for data in images]
        jobs = [i % len(images) for i in range(12)]
        with ThreadPoolExecutor(max_workers=6) as pool:
            together = list(pool.map(lambda i: ask(server.url, images[i]), jobs))
    assert len({json.dumps(r["top_k"]) for r in alone}) == len(images)  # a mix-up would show
    for i, result in zip(jobs, together, strict=True):
        expected = alone[i]
        assert result["image_size"] == expected["image_size"]
        assert [r["index"] for r in result["top_k"]] == [r["index"] for r in expected["top_k"]]
        np.testing.assert_allclose([r["probability"] for r in result["top_k"]],
                                   [r["probability"] for r in expected["top_k"]], atol=1e-6)
        for got, want in zip(result["stages"], expected["stages"], strict=True):
            for key in ("gradcam", "activation"):
                diff = np.abs(np.asarray(decode_data_url(got[key]), dtype=int)
                              - np.asarray(decode_data_url(want[key]), dtype=int))
                assert diff.max() <= 2


def multipart(data: bytes, name: str = "image.png") -> tuple[bytes, str]:
    boundary = "crasmra-test-boundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{name}\""
            f"\r\nContent-Type: application/octet-stream\r\n\r\n").encode() + data + \
        f"\r\n--{boundary}--\r\n".encode()
    return body, boundary


# ---------------------------------------------------------------------------------------------
# bad input: a 4xx JSON message, never a traceback
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("data", "status", "words"), [
    (b"this is a text file, not an image", 415, "not an image"),
    (png_bytes((64, 64), seed=1)[:200], 422, "broken"),
    (b"", 400, "empty"),
])
def test_bad_images_get_a_message(client: TestClient, data: bytes, status: int,
                                  words: str) -> None:
    response = post_image(client, data)
    assert response.status_code == status
    assert words in response.json()["error"]
    assert "Traceback" not in response.text


def test_requests_without_an_image_field(client: TestClient) -> None:
    for kwargs in ({"files": {"other": ("x.png", b"abc", "image/png")}},
                   {"data": {"image": "not a file"}},
                   {"content": b"raw bytes", "headers": {"content-type": "image/png"}}):
        response = client.post("/api/predict", **kwargs)
        assert response.status_code == 400, kwargs
        assert "field named 'image'" in response.json()["error"]
    assert client.get("/api/predict").status_code == 405


def test_api_errors_use_the_api_format(client: TestClient) -> None:
    invalid = client.get("/api/examples/1e3")
    assert invalid.status_code == 422
    assert set(invalid.json()) == {"error"} and "index" in invalid.json()["error"]
    assert client.get("/api/nothing").json() == {"error": "Not Found"}
    for method, path, allowed in (("GET", "/api/predict", "POST"), ("PUT", "/api/info", "GET")):
        response = client.request(method, path)
        assert response.status_code == 405
        assert response.json() == {"error": "Method Not Allowed"}
        assert response.headers["allow"] == allowed


def test_client_leaving_mid_upload_logs_one_short_line(
        app: Any, caplog: pytest.LogCaptureFixture) -> None:
    # Neither propagates to the root logger (crasmra's once the command line has run).
    loggers = [logging.getLogger(name) for name in ("crasmra", "uvicorn")]
    for logger in loggers:
        logger.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="crasmra")
    try:
        with serve.ServerThread(app) as server:
            with socket.create_connection((server.host, server.port), timeout=10) as sock:
                body, boundary = multipart(b"\0" * 1000)
                sock.sendall(b"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                             b"Content-Type: multipart/form-data; boundary=%s\r\n"
                             b"Content-Length: 100000\r\n\r\n%s"
                             % (boundary.encode(), body[:-30]))
                time.sleep(0.2)
            wait_for(lambda: any("left" in r.getMessage() for r in caplog.records), 5)
            time.sleep(0.2)
    finally:
        for logger in loggers:
            logger.removeHandler(caplog.handler)
    records = [r for r in caplog.records if r.name.startswith(("crasmra", "uvicorn"))]
    assert [(r.levelno, r.getMessage()) for r in records] == [
        (logging.INFO, "Client left during POST /api/predict")]
    assert records[0].exc_info is None


def test_server_failures_are_json_without_traceback(tiny_checkpoint: Path, model: Any,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    app = serve.create_app(model, examples=[])

    def fail(data: bytes) -> dict[str, Any]:
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(app.app.state.predictor, "predict_bytes", fail)
    with TestClient(app, base_url=BASE, raise_server_exceptions=False) as c:
        response = post_image(c, png_bytes((64, 64), seed=0))
    assert response.status_code == 500
    assert "secret" not in response.text and "Traceback" not in response.text
    assert "error" in response.json()


# ---------------------------------------------------------------------------------------------
# limits
# ---------------------------------------------------------------------------------------------
def test_oversized_file_is_refused(small_client: TestClient) -> None:
    limit = 50 * 1024
    # Over the file limit, within the multipart slack: refused after reading limit + 1 bytes.
    response = post_image(small_client, b"\0" * (limit + 1))
    assert response.status_code == 413 and "--max-upload-mb" in response.json()["error"]
    # Far over: refused on Content-Length before the body is read.
    response = post_image(small_client, b"\0" * (limit + serve.MULTIPART_SLACK + 1))
    assert response.status_code == 413 and "larger than" in response.json()["error"]


def test_oversized_stream_without_length_is_cut_off(small_client: TestClient) -> None:
    def chunks() -> Iterator[bytes]:  # no Content-Length: sent chunked
        body, _ = multipart(b"\0" * (10 * 2**20))
        for start in range(0, len(body), 16 * 1024):
            yield body[start:start + 16 * 1024]

    response = small_client.post(
        "/api/predict", content=chunks(),
        headers={"content-type": "multipart/form-data; boundary=crasmra-test-boundary"})
    assert response.status_code == 413
    assert "larger than" in response.json()["error"]


def test_huge_declared_length_is_refused_before_the_body(small_app: Any) -> None:
    with serve.ServerThread(small_app) as server, \
            socket.create_connection((server.host, server.port), timeout=30) as sock:
        sock.sendall(b"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Content-Type: multipart/form-data; boundary=x\r\n"
                     b"Content-Length: 100000000000\r\n\r\n")
        # No body is ever sent: the whole answer must come before it.
        answer = b""
        while b"\r\n\r\n" not in answer or b"larger than" not in answer:
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
        answer = answer.decode("latin-1")
    assert answer.startswith("HTTP/1.1 413"), answer[:200]
    assert "larger than" in answer


def test_too_many_pixels_is_refused_before_decoding(client: TestClient,
                                                    small_client: TestClient) -> None:
    # 120 x 100 = 12 000 pixels > 10 000; a real, decodable image.
    response = post_image(small_client, png_bytes((120, 100), seed=0))
    assert response.status_code == 413 and "--max-pixels" in response.json()["error"]
    # 8000 x 8000 = 64 MP > 40 MP by default. The file holds no pixel data: it is refused from
    # its header (decoding would have failed with 422).
    response = post_image(client, png_header_only(8000, 8000))
    assert response.status_code == 413
    assert "8000 x 8000" in response.json()["error"]


def _blocking_predictor(app: Any, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, Any]:
    """Make the app's predictions wait for an event; returns (event, the live-call counter)."""
    predictor = app.app.state.predictor
    original = predictor.predict_bytes
    release = threading.Event()
    live = {"now": 0, "most": 0}
    lock = threading.Lock()

    def held(data: bytes) -> dict[str, Any]:
        with lock:
            live["now"] += 1
            live["most"] = max(live["most"], live["now"])
        try:
            assert release.wait(30)
            return original(data)
        finally:
            with lock:
                live["now"] -= 1

    monkeypatch.setattr(predictor, "predict_bytes", held)
    return release, live


def test_busy_server_answers_503_with_retry_after(model: Any,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    app = serve.create_app(model, examples=[], max_concurrent=1, max_queue=1)
    gate = app.app.state.gate
    release, live = _blocking_predictor(app, monkeypatch)
    image = png_bytes((64, 64), seed=0)
    with serve.ServerThread(app) as server, ThreadPoolExecutor(max_workers=2) as pool:
        try:
            running = pool.submit(post_raw, server.url, image)
            assert wait_for(lambda: live["now"] == 1)
            waiting = pool.submit(post_raw, server.url, image)
            assert wait_for(lambda: gate.inside == 2)
            # One decoding, one waiting: a third upload is refused at once, in the API's format.
            status, headers, body = post_raw(server.url, image)
            assert status == 503, body
            assert "busy" in body["error"] and "--max-concurrent" in body["error"]
            assert int(headers["Retry-After"]) >= 1
        finally:
            release.set()
        assert running.result()[0] == waiting.result()[0] == 200
        assert live["most"] == 1 and gate.inside == gate.running == 0
        assert post_raw(server.url, image)[0] == 200  # the places are given back


def test_at_most_max_concurrent_images_are_decoded_at_once(
        model: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    app = serve.create_app(model, examples=[], max_concurrent=2, max_queue=4)
    release, live = _blocking_predictor(app, monkeypatch)
    image = png_bytes((64, 64), seed=0)
    with serve.ServerThread(app) as server, ThreadPoolExecutor(max_workers=6) as pool:
        try:
            answers = [pool.submit(post_raw, server.url, image) for _ in range(6)]
            assert wait_for(lambda: app.app.state.gate.inside == 6)
            time.sleep(0.1)
            assert live["now"] == 2
        finally:
            release.set()
        assert [a.result()[0] for a in answers] == [200] * 6
    assert live["most"] == 2


def image_bytes(mode: str, size: tuple[int, int], fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, format=fmt)
    return buffer.getvalue()


def test_images_that_take_more_memory_take_more_turns(
        model: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # One turn: an RGB image of 10 000 pixels (80 kB decoding) and a 50 KiB file.
    app = serve.create_app(model, max_upload_mb=50 / 1024, max_pixels=10_000, examples=[])
    gate = app.app.state.gate
    release, live = _blocking_predictor(app, monkeypatch)
    rgba = image_bytes("RGBA", (100, 100))  # 24 bytes a pixel: two turns
    with serve.ServerThread(app) as server, ThreadPoolExecutor(max_workers=2) as pool:
        try:
            rgb = pool.submit(post_raw, server.url, image_bytes("RGB", (100, 100)))
            assert wait_for(lambda: live["now"] == 1)
            alpha = pool.submit(post_raw, server.url, rgba)
            assert wait_for(lambda: gate.inside == 2 and len(gate._waiters) == 1)
            assert live["now"] == 1 and gate.running == 1  # one turn free, not enough
        finally:
            release.set()
        assert rgb.result()[0] == alpha.result()[0] == 200
    assert live["most"] == 1 and gate.running == 0
    # More than all the turns: refused from the header.
    single = serve.create_app(model, max_upload_mb=50 / 1024, max_pixels=10_000, examples=[],
                              max_concurrent=1)
    with TestClient(single, base_url=BASE) as c:
        response = post_image(c, rgba)
        assert response.status_code == 413
        assert "in mode RGBA" in response.json()["error"]
        assert "--max-concurrent x --max-pixels" in response.json()["error"]
        assert post_image(c, image_bytes("RGB", (100, 100))).status_code == 200


@pytest.mark.parametrize(("mode", "fmt", "per_pixel"), [
    ("RGB", "PNG", 8), ("L", "JPEG", 8), ("P", "GIF", 8), ("RGBA", "PNG", 24),
    ("LA", "PNG", 24), ("CMYK", "JPEG", 14), ("I;16", "PNG", 28), ("F", "TIFF", 40),
    ("RGB", "WEBP", 16),
])
def test_decode_memory_is_estimated_from_the_header(mode: str, fmt: str,
                                                    per_pixel: int) -> None:
    header = serve.read_header(io.BytesIO(image_bytes(mode, (30, 20), fmt)), 10_000)
    assert (header.width, header.height) == (30, 20)
    assert header.decode_bytes() == per_pixel * 600


def test_gate_serves_in_order_and_passes_on_cancelled_turns() -> None:
    async def scenario() -> list[str]:
        gate = serve.guard.Gate(slots=2, queue=4)
        order = []
        hold = {"first": asyncio.Event(), "big": asyncio.Event()}

        async def user(name: str, turns: int = 1) -> None:
            async with gate.slot(turns):
                order.append(name)
                if name in hold:
                    await hold[name].wait()

        first = asyncio.create_task(user("first"))
        await asyncio.sleep(0)
        big = asyncio.create_task(user("big", turns=2))  # waits: one turn is taken
        await asyncio.sleep(0)
        small = asyncio.create_task(user("small"))  # one turn is free, but "big" came first
        await asyncio.sleep(0.01)
        assert order == ["first"] and gate.running == 1 and len(gate._waiters) == 2
        big.cancel()  # its place passes on at once
        await asyncio.sleep(0.01)
        assert order == ["first", "small"]
        again = asyncio.create_task(user("big", turns=2))
        await asyncio.sleep(0.01)
        hold["first"].set()
        await asyncio.sleep(0.01)
        assert order == ["first", "small", "big"] and gate.running == 2
        hold["big"].set()
        await asyncio.gather(first, small, again)
        with pytest.raises(asyncio.CancelledError):
            await big
        assert gate.running == 0 and not gate._waiters
        return order

    assert asyncio.run(scenario()) == ["first", "small", "big"]


def test_large_images_give_memory_back(model: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(serve.predictor, "release_memory", lambda: calls.append(1))
    predictor = serve.Predictor(model)
    small = png_bytes((64, 64), seed=0)
    buffer = io.BytesIO()
    Image.new("RGB", (1500, 1400), (90, 140, 30)).save(buffer, format="PNG")  # 2.1 MP
    assert predictor.predict_bytes(small)["image_size"] == [64, 64]
    assert calls == []  # small images cost no trim
    assert predictor.predict_bytes(buffer.getvalue())["image_size"] == [1500, 1400]
    assert calls == [1]
    with pytest.raises(serve.RequestError):
        predictor.predict_bytes(small[:200])  # a failed decode may have allocated the lot
    assert calls == [1, 1]
    monkeypatch.undo()
    serve.release_memory()  # and the real one runs here (glibc) or does nothing


def test_only_loopback_host_names_are_answered(client: TestClient, model: Any) -> None:
    for host in ("localhost:7860", "127.0.0.1", "[::1]:7860"):
        assert client.get("/api/info", headers={"host": host}).status_code == 200, host
    refused = client.get("/api/info", headers={"host": "attacker.example"})
    assert refused.status_code == 400 and "Host" in refused.json()["error"]
    open_app = serve.create_app(model, allowed_hosts=None, examples=[])
    with TestClient(open_app, base_url="http://attacker.example") as c:
        assert c.get("/api/info").status_code == 200


@pytest.mark.parametrize("host", [
    "localhost:1@evil.com", "localhost@evil.com", "user@localhost", "localhost:99999",
    "localhost:80:80", "localhost/evil", "local host", "localhost,evil.com", "::1", "[::1",
    "[evil.com]", "[::1]evil.com", "localhost:+80",
])
def test_malformed_host_headers_are_refused(client: TestClient, model: Any, host: str) -> None:
    refused = client.get("/api/info", headers={"host": host})
    assert refused.status_code == 400, host
    assert refused.json() == {"error": "Invalid Host header."}
    # Also when any host name is answered (a server exposed on purpose).
    open_app = serve.create_app(model, allowed_hosts=None, examples=[])
    with TestClient(open_app, base_url=BASE) as c:
        assert c.get("/api/info", headers={"host": host}).status_code == 400, host
        assert c.get("/api/info", headers={"host": "my-box.lan:8080"}).status_code == 200


def test_stalled_upload_gets_408_and_is_closed(model: Any) -> None:
    app = serve.create_app(model, examples=[], body_timeout=0.5)
    with serve.ServerThread(app) as server:
        start = time.monotonic()
        # Declares 1000 bytes, sends 10, then waits.
        answer, closed = raw_exchange(server, b"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                              b"Content-Type: multipart/form-data; boundary=x\r\n"
                                              b"Content-Length: 1000\r\n\r\n--x\r\nabcd")
        elapsed = time.monotonic() - start
    assert answer.startswith("HTTP/1.1 408"), answer[:200]
    assert closed and elapsed < 5
    assert answer.endswith('{"error":"The request body did not arrive within 0.5 s '
                           '(--body-timeout)."}')


# ---------------------------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------------------------
def test_default_host_is_loopback() -> None:
    ns = build_parser().parse_args(["serve", "model.ckpt"])
    assert (ns.host, ns.port, ns.max_upload_mb, ns.max_pixels) == (
        serve.DEFAULT_HOST, serve.DEFAULT_PORT, serve.DEFAULT_MAX_UPLOAD_MB,
        serve.DEFAULT_MAX_PIXELS)
    assert (ns.max_concurrent, ns.max_queue, ns.body_timeout) == (
        serve.DEFAULT_MAX_CONCURRENT, serve.DEFAULT_MAX_QUEUE, serve.DEFAULT_BODY_TIMEOUT)
    assert serve.is_loopback(ns.host)
    for host in ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"):
        assert serve.is_loopback(host), host
    for host in ("0.0.0.0", "::", "192.168.1.20", "example.com"):
        assert not serve.is_loopback(host), host


@pytest.mark.parametrize(("host", "warned", "hosts"), [
    ("127.0.0.1", False, serve.LOOPBACK_NAMES),
    ("0.0.0.0", True, None),
])
def test_cli_serves_and_warns_when_exposed(
    tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
    host: str, warned: bool, hosts: frozenset[str] | None,
) -> None:
    served = {}

    def fake_run(app: Any, sock: socket.socket, **kwargs: Any) -> None:
        served.update(app=app, address=sock.getsockname())

    monkeypatch.setattr(serve, "run_server", fake_run)
    assert main(["serve", str(tiny_checkpoint), "--host", host, "--port", "0"]) == 0
    err = capsys.readouterr().err
    assert ("WARNING" in err) is warned
    assert served["address"][0] == host and served["address"][1] > 0
    assert served["app"].allowed_hosts == hosts
    assert f"http://{host}:{served['address'][1]}" in err


def test_cli_usage_errors(tiny_checkpoint: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["serve", str(tiny_checkpoint), "--port", "70000"]) == 2
    assert main(["serve", str(tiny_checkpoint), "--max-upload-mb", "0"]) == 2
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        assert main(["serve", str(tiny_checkpoint), "--port", str(port)]) == 2
    assert main(["serve", "missing.ckpt", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "--port must be" in err and "--max-upload-mb must be" in err
    assert "Choose one with --port" in err and "Traceback" not in err


@pytest.mark.parametrize(("args", "message"), [
    (["--max-upload-mb", "inf"], "--max-upload-mb must be a positive finite number, got inf."),
    (["--max-upload-mb", "nan"], "--max-upload-mb must be a positive finite number, got nan."),
    (["--max-upload-mb", "0"], "--max-upload-mb must be a positive finite number, got 0."),
    (["--max-upload-mb=-5"], "--max-upload-mb must be a positive finite number, got -5."),
    (["--max-upload-mb", "1e300"], "--max-upload-mb must be at most 4096, got 1e+300."),
    (["--body-timeout", "nan"], "--body-timeout must be a positive finite number, got nan."),
    (["--max-concurrent", "0"], "--max-concurrent must be at least 1, got 0."),
    (["--max-queue=-1"], "--max-queue must be at least 0, got -1."),
    (["--max-pixels=-1"], "--max-pixels must be at least 1, got -1."),
])
def test_cli_refuses_limits_that_are_not_positive_finite(
    tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
    args: list[str], message: str,
) -> None:
    served = []
    monkeypatch.setattr(serve, "run_server", lambda *a, **k: served.append(a))
    assert main(["serve", str(tiny_checkpoint), "--port", "0", *args]) == 2
    assert capsys.readouterr().err == f"crasmra: error: {message}\n"
    assert not served
