"""`crasmra export`: ONNX (run with onnxruntime alone), TorchScript and safetensors round trips."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import crasmra.export as export_module
from attention_helpers import SIZE, attention_network, registered_attention
from conftest import run_cli
from crasmra.data import load_image
from crasmra.export import ExportParityError, ExportWrapper, export_model
from crasmra.inference import load_model
from crasmra.model import CRASMRANet, create_model
from test_inference import NUM_CLASSES, write_images


@pytest.fixture(scope="module")
def model(tiny_checkpoint: Path) -> CRASMRANet:
    return load_model(tiny_checkpoint)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_images(tmp_path_factory.mktemp("export-images"))


@pytest.fixture(scope="module")
def batch(model: CRASMRANet, images: Path) -> torch.Tensor:
    """Real images, prepared with the checkpoint's eval transform: (4, 3, 64, 64)."""
    return torch.stack([model.transform(load_image(p)) for p in sorted(images.rglob("*.png"))])


def readme_preprocess(path: Path, t: dict) -> np.ndarray:
    """The README's preprocessing with PIL and numpy only (no torch, no crasmra)."""
    from PIL import Image, ImageOps

    def hw(size: int | list[int]) -> tuple[int, int]:
        return (size, size) if isinstance(size, int) else (size[0], size[1])

    (rh, rw), (ch, cw) = hw(t["resize_size"]), hw(t["image_size"])
    img = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
    img = img.resize((rw, rh), Image.BILINEAR)
    top, left = round((rh - ch) / 2), round((rw - cw) / 2)
    img = img.crop((left, top, left + cw, top + ch))
    x = np.asarray(img, dtype=np.float32) / 255.0
    x = (x - np.array(t["mean"], dtype=np.float32)) / np.array(t["std"], dtype=np.float32)
    return x.transpose(2, 0, 1)


def _max_diff(stdout: str) -> float:
    return float(re.search(r"max \|diff\| (\S+) ", stdout).group(1))  # type: ignore[union-attr]


def test_onnx_export_runs_in_onnxruntime_alone(tiny_checkpoint: Path, model: CRASMRANet,
                                               batch: torch.Tensor, images: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    import onnx
    import onnxruntime as ort

    out = tmp_path / "model.onnx"
    code = run_cli(["export", str(tiny_checkpoint), "--format", "onnx", "--out", str(out),
                    "--head-logits"])
    assert code == 0
    assert _max_diff(capsys.readouterr().out) <= 1e-4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]  # no temporary left

    graph = onnx.load(str(out))
    assert not any("smram" in init.name for init in graph.graph.initializer)
    props = {p.key: p.value for p in graph.metadata_props}
    assert json.loads(props["classes"]) == model.classes
    assert json.loads(props["transform"]) == model.preprocessing.as_config()

    # what the README shows: onnxruntime, PIL and numpy only, any batch size
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    assert names == ["probs", "logits_stage3", "logits_stage4", "logits_stage5", "logits_concat"]
    meta = session.get_modelmeta().custom_metadata_map
    transform = json.loads(meta["transform"])
    inputs = np.stack([readme_preprocess(p, transform) for p in sorted(images.rglob("*.png"))])
    np.testing.assert_allclose(inputs, batch.numpy(), atol=1e-6, rtol=0)
    probs, *logits = session.run(None, {"images": inputs})
    assert json.loads(meta["classes"]) == model.classes
    with torch.inference_mode():
        reference = model(batch)
    assert probs.shape == (len(batch), NUM_CLASSES)
    np.testing.assert_allclose(probs, reference.probs.numpy(), atol=1e-4, rtol=0)
    for got, want in zip(logits, reference.logits, strict=True):
        np.testing.assert_allclose(got, want.numpy(), atol=1e-4, rtol=0)


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_torchscript_round_trip(model: CRASMRANet, batch: torch.Tensor, tmp_path: Path) -> None:
    result = export_model(model, "torchscript", tmp_path / "model.pt")
    assert result.max_abs_diff <= 1e-4 and result.outputs == ["probs"]
    extra = {"crasmra.json": ""}
    scripted = torch.jit.load(str(result.path), _extra_files=extra)
    assert json.loads(extra["crasmra.json"])["classes"] == model.classes
    with torch.inference_mode():
        got, want = scripted(batch), model(batch).probs
    assert got.shape == (len(batch), NUM_CLASSES)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


#: The largest output difference of one network's weights run twice on a CPU (float32
#: rounding of kernels that take other paths; 3e-8 measured).
SAME_WEIGHTS_TOLERANCE = 1e-6


def _assert_same_state(reloaded: torch.nn.Module, original: torch.nn.Module) -> None:
    expected = original.state_dict()
    state = reloaded.state_dict()
    assert state.keys() == expected.keys()
    for key, value in state.items():
        assert torch.equal(value, expected[key]), key


def test_safetensors_round_trip(tiny_checkpoint: Path, model: CRASMRANet, batch: torch.Tensor,
                                images: Path, tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "model.safetensors"
    assert run_cli(["export", str(tiny_checkpoint), "--format", "safetensors",
                    "--out", str(out)]) == 0
    # The same weights, bit for bit; the outputs may differ in the last bits, as the CPU's
    # convolution kernels can take other paths for other buffers (seen with AVX-512).
    assert _max_diff(capsys.readouterr().out) <= SAME_WEIGHTS_TOLERANCE
    reloaded = load_model(out)
    assert reloaded.classes == model.classes
    assert reloaded.preprocessing == model.preprocessing
    _assert_same_state(reloaded, model)
    with torch.inference_mode():
        torch.testing.assert_close(reloaded(batch).probs, model(batch).probs,
                                   atol=SAME_WEIGHTS_TOLERANCE, rtol=0)
    # the export stands in for the checkpoint in the other commands
    assert run_cli(["predict", str(out), str(images), "--format", "json", "--quiet"]) == 0
    assert len(json.loads(capsys.readouterr().out)["predictions"]) == NUM_CLASSES


def test_parity_failure_is_loud_and_leaves_no_file(model: CRASMRANet, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_export(wrapper, example, path, meta):  # a "compiler" that is off by 1e-3
        path.write_bytes(b"exported")
        return lambda x: tuple(o + 1e-3 for o in export_module._as_tuple(wrapper(x)))

    monkeypatch.setattr(export_module, "_export_torchscript", broken_export)
    out = tmp_path / "model.pt"
    with pytest.raises(ExportParityError, match=r"differs from the eager network by up to 0\.001"):
        export_model(model, "torchscript", out)
    assert list(tmp_path.iterdir()) == []


def test_export_wrapper_and_argument_checks(model: CRASMRANet, tmp_path: Path) -> None:
    x = torch.zeros(2, 3, 64, 64)
    with torch.inference_mode():
        probs = ExportWrapper(model)(x)
        outputs = ExportWrapper(model, head_logits=True)(x)
    assert probs.shape == (2, NUM_CLASSES) and len(outputs) == 5
    assert ExportWrapper(model, head_logits=True).output_names[-1] == "logits_concat"
    with pytest.raises(ValueError, match="Unknown export format"):
        export_model(model, "tflite", tmp_path / "m.tflite")
    with pytest.raises(ValueError, match=r"\*\.safetensors"):
        export_model(model, "safetensors", tmp_path / "m.bin")
    with pytest.raises(ValueError, match="tolerance"):
        export_model(model, "torchscript", tmp_path / "m.pt", tolerance=0)


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_plain_checkpoint_exports_to_every_format(plain_checkpoint: Path, batch: torch.Tensor,
                                                  tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    import onnxruntime as ort

    plain = load_model(plain_checkpoint)
    out = tmp_path / "plain.onnx"
    assert run_cli(["export", str(plain_checkpoint), "--format", "onnx", "--out", str(out),
                    "--head-logits"]) == 0
    assert _max_diff(capsys.readouterr().out) <= 1e-4
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["probs", "logits_classifier"]
    probs, logits = session.run(None, {"images": batch.numpy()})
    with torch.inference_mode():
        reference = plain(batch)
    np.testing.assert_allclose(probs, reference.probs.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(logits, reference.logits[0].numpy(), atol=1e-4, rtol=0)

    assert export_model(plain, "torchscript", tmp_path / "plain.pt").max_abs_diff <= 1e-4
    result = export_model(plain, "safetensors", tmp_path / "plain.safetensors")
    assert result.max_abs_diff <= SAME_WEIGHTS_TOLERANCE
    reloaded = load_model(result.path)
    assert reloaded.variant == "plain" and reloaded.classes == plain.classes
    _assert_same_state(reloaded, plain)
    with torch.inference_mode():
        torch.testing.assert_close(reloaded(batch).probs, reference.probs,
                                   atol=SAME_WEIGHTS_TOLERANCE, rtol=0)


def test_head_weights_reach_every_export(model: CRASMRANet, batch: torch.Tensor,
                                         tmp_path: Path) -> None:
    """A fitted combination is part of the exported prediction and of a re-loaded model."""
    import onnxruntime as ort

    model.set_head_weights([0.0, 0.0, 1.0, 0.0])  # the stage-5 head alone
    try:
        with torch.inference_mode():
            output = model(batch)
        stage5 = output.logits[2].float().softmax(-1)
        torch.testing.assert_close(output.probs, stage5)
        onnx = export_model(model, "onnx", tmp_path / "model.onnx")
        session = ort.InferenceSession(str(onnx.path), providers=["CPUExecutionProvider"])
        got = session.run(["probs"], {"images": batch.numpy()})[0]
        np.testing.assert_allclose(got, stage5.numpy(), atol=1e-4)
        scripted = torch.jit.load(str(export_model(model, "torchscript", tmp_path / "m.pt").path))
        torch.testing.assert_close(scripted(batch), stage5, atol=1e-4, rtol=0)
        saved = export_model(model, "safetensors", tmp_path / "m.safetensors").path
        assert load_model(saved).head_weights == (0.0, 0.0, 1.0, 0.0)
    finally:
        model.set_head_weights(None)


@pytest.mark.parametrize("attention", registered_attention())
@pytest.mark.parametrize("fmt", ["torchscript", "safetensors"])
def test_every_registered_attention_module_exports(attention: str, fmt: str,
                                                   tmp_path: Path) -> None:
    net = attention_network(attention)
    suffix = ".safetensors" if fmt == "safetensors" else ".pt"
    result = export_model(net, fmt, tmp_path / f"model{suffix}")
    assert result.max_abs_diff <= 1e-4
    if fmt == "safetensors":
        reloaded = load_model(result.path)
        x = torch.randn(2, 3, SIZE, SIZE)
        with torch.inference_mode():
            torch.testing.assert_close(reloaded(x).probs, net(x).probs, atol=1e-6, rtol=0)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript", "safetensors"])
def test_top_k_suppression_exports_and_reloads(fmt: str, tmp_path: Path) -> None:
    net = create_model("resnet10t", 5, suppress_top_k=1, head_channels=16,
                       head_hidden=16).eval()
    suffix = {"onnx": ".onnx", "torchscript": ".pt", "safetensors": ".safetensors"}[fmt]
    result = export_model(net, fmt, tmp_path / f"model{suffix}")
    assert result.max_abs_diff <= 1e-4
    if fmt == "safetensors":
        reloaded = load_model(result.path)
        assert all(cram.suppress_top_k == 1 for cram in reloaded.attention)
