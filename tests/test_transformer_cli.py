"""A Swin and a ViT through the command line: fit and an ONNX export for both, predict and cam
for the ViT (their code reads only the (B, C, H, W) stage maps, the same for every family), at
the smallest sizes their stages allow (random init, no download)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_cli, tiny_fit_args


@pytest.mark.parametrize(
    ("backbone", "size", "stages", "family", "predicts"),
    [
        # Early stages keep the run small: Swin's first three (its fourth, half of its
        # weights, is dropped), the ViT's first four blocks as stages 2-4.
        ("swin_tiny_patch4_window7_224", 64, "[0,1,2]", "hierarchical", False),
        ("vit_tiny_patch16_224", 32, "[1,2,3]", "tokens", True),
    ],
)
def test_a_transformer_trains_predicts_explains_and_exports(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], backbone: str, size: int, stages: str,
    family: str, predicts: bool,
) -> None:
    from crasmra.inference import load_model

    root = tmp_path / "run"
    args = tiny_fit_args(root, f"--model.net.backbone={backbone}", f"--data.image_size={size}",
                         f"--data.resize_size={size + 8}", f"--model.net.stage_indices={stages}",
                         "--test_after_fit=false")
    assert run_cli(args) == 0
    checkpoint = root / "checkpoints" / "best.ckpt"
    model = load_model(checkpoint)
    # Built for the training crop, recorded so that the checkpoint rebuilds the same network.
    assert model.backbone.family == family and model.config["img_size"] == size
    assert model.config["stage_indices"] == json.loads(stages)
    assert model.backbone.data_config["input_size"] == (3, size, size)

    if predicts:
        _predict_and_explain(tmp_path, checkpoint, model, size, capsys)
    onnx_file = tmp_path / "model.onnx"
    assert run_cli(["export", str(checkpoint), "--format", "onnx", "--out", str(onnx_file)]) == 0
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    batch = torch.randn(2, 3, size, size)
    [probs] = session.run(["probs"], {"images": batch.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(probs, model(batch).probs.numpy(), atol=1e-4)


def _predict_and_explain(tmp_path: Path, checkpoint: Path, model: Any, size: int,
                         capsys: pytest.CaptureFixture[str]) -> None:
    image = tmp_path / "bird.png"
    pixels = np.random.default_rng(0).integers(0, 255, (size + 20, size + 10, 3), np.uint8)
    Image.fromarray(pixels).save(image)
    capsys.readouterr()
    assert run_cli(["predict", str(checkpoint), str(image), "--format", "json", "--quiet"]) == 0
    [prediction] = json.loads(capsys.readouterr().out)["predictions"]
    with torch.no_grad():
        expected = model(model.transform(Image.open(image).convert("RGB"))[None]).probs[0]
    top = prediction["top_k"][0]
    assert top["index"] == int(expected.argmax())
    assert top["probability"] == pytest.approx(float(expected.max()), abs=1e-4)

    assert run_cli(["cam", str(checkpoint), str(image), "--out", str(tmp_path / "cam"),
                    "--device", "cpu"]) == 0
    assert (tmp_path / "cam" / "bird_cam.png").is_file()


def test_grad_cam_of_a_plain_vit_says_to_explain_a_cra_smra_variant() -> None:
    from crasmra.model import create_model
    from crasmra.viz.gradcam import stage_gradcams

    plain = create_model("vit_tiny_patch16_224", 3, variant="plain", img_size=32)
    with pytest.raises(ValueError, match=r"gives \(1, 5, 192\).*tokens.*variant cra-smra"):
        stage_gradcams(plain, torch.randn(3, 32, 32))
