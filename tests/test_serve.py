"""`crasmra serve`: the HTTP API end to end with the tiny checkpoint, and its safety limits."""

from __future__ import annotations

import base64
import io
import json
import socket
import struct
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

from crasmra import serve
from crasmra.cli import build_parser, main
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
    from crasmra.checkpoint import save_safetensors
    from crasmra.inference import model_metadata

    export = save_safetensors(tmp_path / "m.safetensors", model.state_dict(),
                              model_metadata(model))
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


def test_single_pass_gradcam_equals_viz_gradcam(model: Any) -> None:
    pytest.importorskip("pytorch_grad_cam", reason="grad-cam is not installed")
    from crasmra.viz import activation_maps, gradcam_maps

    x = model.transform(Image.open(io.BytesIO(png_bytes((80, 64), seed=3)))).unsqueeze(0)
    result = serve.explain_tensor(model, x)
    reference = gradcam_maps(model, x, result.class_index)
    for ours, theirs in zip(result.gradcam, reference, strict=True):
        assert ours.shape == theirs.shape == (64, 64)
        np.testing.assert_allclose(ours, theirs, atol=1e-4)
    with torch.inference_mode():
        output = model(x)
    assert torch.allclose(result.probs, output.probs[0], atol=1e-6)
    for ours, theirs in zip(result.activation, activation_maps(output.features, (64, 64)),
                            strict=True):
        np.testing.assert_allclose(ours, theirs, atol=1e-5)
    # autograd.grad leaves nothing behind on the shared model.
    assert all(p.grad is None for p in model.parameters())


def test_plain_model_shows_the_last_stage(plain_checkpoint: Path) -> None:
    pytest.importorskip("pytorch_grad_cam", reason="grad-cam is not installed")
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


def test_only_loopback_host_names_are_answered(client: TestClient, model: Any) -> None:
    for host in ("localhost:7860", "127.0.0.1", "[::1]:7860"):
        assert client.get("/api/info", headers={"host": host}).status_code == 200, host
    refused = client.get("/api/info", headers={"host": "attacker.example"})
    assert refused.status_code == 400 and "Host" in refused.json()["error"]
    open_app = serve.create_app(model, allowed_hosts=None, examples=[])
    with TestClient(open_app, base_url="http://attacker.example") as c:
        assert c.get("/api/info").status_code == 200


# ---------------------------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------------------------
def test_default_host_is_loopback() -> None:
    ns = build_parser().parse_args(["serve", "model.ckpt"])
    assert (ns.host, ns.port, ns.max_upload_mb, ns.max_pixels) == (
        serve.DEFAULT_HOST, serve.DEFAULT_PORT, serve.DEFAULT_MAX_UPLOAD_MB,
        serve.DEFAULT_MAX_PIXELS)
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
