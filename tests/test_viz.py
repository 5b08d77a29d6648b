"""`crasmra cam` (Grad-CAM / activation / SMRAM grids, CRAM importance) and `crasmra report`."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchmetrics.classification import MulticlassCalibrationError

from attention_helpers import (
    SCALE,
    SIZE,
    attention_network,
    library_gradcam,
    registered_attention,
)
from conftest import run_cli
from crasmra.checkpoint import build_metadata, network_state_dict, save_safetensors
from crasmra.inference import expected_calibration_error, load_model
from crasmra.layers import record_channel_importance
from crasmra.model import CRASMRANet
from crasmra.viz import (
    activation_maps,
    channel_importance,
    explain_image,
    gradcam_maps,
    true_label_from_path,
)
from test_inference import NUM_CLASSES, write_images


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_images(tmp_path_factory.mktemp("viz-images"))


@pytest.fixture(scope="module")
def model(tiny_checkpoint: Path) -> CRASMRANet:
    return load_model(tiny_checkpoint)


@pytest.fixture(scope="module")
def bare_checkpoint(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The checkpoint without data settings, alone in a folder (no run folder around it)."""
    ckpt = torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)
    path = tmp_path_factory.mktemp("bare") / "model.ckpt"
    torch.save({"state_dict": ckpt["state_dict"], "crasmra": ckpt["crasmra"]}, path)
    return path


def _png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        return image.size


def test_cam_command_writes_grids(tiny_checkpoint: Path, images: Path, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    image = sorted(images.rglob("*.png"))[0]
    out = tmp_path / "cam"
    code = run_cli(["cam", str(tiny_checkpoint), str(image), str(images / "bad.jpg"),
                    "--out", str(out), "--train-maps", "--device", "cpu"])
    assert code == 0
    captured = capsys.readouterr()
    assert "bad.jpg" in captured.err and "predicted" in captured.out
    grid, importance = out / f"{image.stem}_cam.png", out / f"{image.stem}_importance.png"
    assert sorted(p.name for p in out.iterdir()) == sorted([grid.name, importance.name])
    width, height = _png_size(grid)
    # four columns (input + three stages) by three rows (Grad-CAM, activation, SMRAM)
    assert width > height > 0.6 * width
    assert _png_size(importance)[0] > 2 * _png_size(importance)[1]


def test_explain_image_maps(model: CRASMRANet, images: Path, tmp_path: Path) -> None:
    image = sorted(images.rglob("*.png"))[-1]
    x = model.transform(Image.open(image).convert("RGB"))[None]
    with torch.inference_mode(), record_channel_importance(model.attention) as records:
        output = model(x)
    importance = channel_importance(records)
    assert [len(i) for i in importance] == [m.in_channels for m in model.attention]
    assert all(((i > 0) & (i < 1)).all() for i in importance)
    predicted = int(output.probs.argmax())
    for maps in (gradcam_maps(model, x, predicted), activation_maps(output.features, (64, 64))):
        assert len(maps) == len(model.stage_names)
        for m in maps:
            assert m.shape == (64, 64) and np.isfinite(m).all()
            assert m.min() >= 0.0 and m.max() <= 1.0 + 1e-6
    assert all(p.grad is None for p in model.parameters())  # Grad-CAM leaves no gradients
    # also with frozen parameters under no_grad, as a deployment script might call it
    model.requires_grad_(False)
    try:
        with torch.no_grad():
            frozen = gradcam_maps(model, x, predicted)
    finally:
        model.requires_grad_(True)
    assert len(frozen) == len(model.stage_names)

    truth = true_label_from_path(image, model.classes)
    assert truth == image.parent.name
    result = explain_image(model, image, tmp_path, name="x", true_label=truth)
    assert result.grid == tmp_path / "x_cam.png"
    assert result.importance == tmp_path / "x_importance.png"
    assert result.predicted == model.classes[predicted] and result.true_label == truth
    width, height = _png_size(result.grid)
    assert height < 0.6 * width  # two rows without SMRAM


def test_train_maps_need_a_training_checkpoint(model: CRASMRANet, images: Path, tmp_path: Path,
                                               tiny_checkpoint: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)
    meta = build_metadata(model.config, model.classes, model.preprocessing.as_config(),
                          model.data_config)
    export = save_safetensors(tmp_path / "model.safetensors",
                              network_state_dict(ckpt, tiny_checkpoint), meta)
    code = run_cli(["cam", str(export), str(images), "--out", str(tmp_path), "--train-maps"])
    assert code == 2
    assert "no SMRAM weights" in capsys.readouterr().err


def test_cam_needs_no_grad_cam_package(tiny_checkpoint: Path, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pytorch_grad_cam", None)
    images = write_images(tmp_path / "images")
    image = next(images.rglob("*.png"))
    out = tmp_path / "cam"
    assert run_cli(["cam", str(tiny_checkpoint), str(image), "--out", str(out)]) == 0
    assert (out / f"{image.stem}_cam.png").is_file()


@pytest.mark.parametrize("attention", registered_attention())
def test_cam_explains_every_registered_attention_module(attention: str, tmp_path: Path) -> None:
    net = attention_network(attention)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (80, 72, 3), np.uint8))
    x = net.transform(image)[None]
    predicted = int(net(x).probs.argmax())
    maps = gradcam_maps(net, x, predicted)
    assert len(maps) == len(net.stage_names) == len(net.attention)
    for m in maps:
        assert m.shape == (SIZE, SIZE) and np.isfinite(m).all()
        assert m.min() >= 0.0 and m.max() <= 1.0 + 1e-6
    assert all(p.grad is None for p in net.parameters())
    if importlib.util.find_spec("pytorch_grad_cam") is not None:
        reference = library_gradcam(net, x, predicted)
        for ours, theirs in zip(maps, reference or [], strict=False):
            np.testing.assert_allclose(ours, theirs, atol=1e-4)
    result = explain_image(net, image, tmp_path, name="x")
    assert result.grid.is_file() and result.predicted == net.classes[predicted]


def test_a_module_whose_head_map_is_not_a_map_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    net = attention_network(SCALE)
    real = net.forward_features

    def flat(x: torch.Tensor) -> list[torch.Tensor]:
        return [f.mean(dim=(2, 3)) for f in real(x)]

    monkeypatch.setattr(net, "forward_features", flat)
    with pytest.raises(ValueError, match=r"stage3 \(ScaleAttention\).*\(x_e, x_s\)"):
        gradcam_maps(net, torch.zeros(1, 3, SIZE, SIZE), 0)


def test_report_on_the_checkpoints_own_test_split(tiny_run: Path, tiny_checkpoint: Path,
                                                  tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "report"
    assert run_cli(["report", str(tiny_checkpoint), "--out", str(out), "--quiet"]) == 0
    assert "combined top-1" in capsys.readouterr().out
    names = {p.name for p in out.iterdir()}
    assert names == {"report.md", "report.json", "reliability.png", "confusion_matrix.png"}
    for png in ("reliability.png", "confusion_matrix.png"):
        _png_size(out / png)
    report = json.loads((out / "report.json").read_text())
    assert report["context"]["dataset"] == "synthetic" and report["context"]["split"] == "test"
    assert list(report["heads"]) == ["stage3", "stage4", "stage5", "concat", "combined"]
    assert report["heads"]["combined"]["top5"] is None  # undefined for 4 classes
    # the same figure the training run's own test pass logged
    logged = json.loads((tiny_run / "metrics.json").read_text())["test"]
    for head, values in report["heads"].items():
        assert values["top1"] == pytest.approx(logged[f"test/{head}_top1"], abs=1e-6), head
    n = report["num_images"]
    per_class = report["per_class"]
    assert len(per_class) == NUM_CLASSES and sum(c["support"] for c in per_class) == n
    assert sum(c["correct"] for c in per_class) / n == pytest.approx(
        report["heads"]["combined"]["top1"])
    cm = np.array(report["confusion_matrix"])
    assert cm.sum() == n
    counts = [p["count"] for p in report["confused_pairs"]]
    assert counts == sorted(counts, reverse=True)
    for pair in report["confused_pairs"]:
        assert pair["true"] != pair["predicted"]
        assert cm[pair["true_index"], pair["predicted_index"]] == pair["count"]
    calibration = report["calibration"]
    assert 0.0 <= calibration["ece"] <= 1.0
    assert sum(b["count"] for b in calibration["bins"]) == n
    md = (out / "report.md").read_text()
    for section in ("Accuracy by head", "Per-class accuracy", "Most confused pairs",
                    "Expected calibration error", "(reliability.png)", "(confusion_matrix.png)"):
        assert section in md


def test_report_needs_a_dataset_when_the_checkpoint_names_none(
    bare_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli(["report", str(bare_checkpoint), "--out", str(tmp_path)]) == 2
    assert "--data" in capsys.readouterr().err
    args = ["report", str(bare_checkpoint), "--out", str(tmp_path), "--quiet",
            "--data", "synthetic", "--option", "native_size=64"]
    # another class count than the checkpoint's is refused before any work
    assert run_cli([*args, "--option", "num_classes=5"]) == 2
    assert f"trained for {NUM_CLASSES} classes, but 5" in capsys.readouterr().err
    assert run_cli([*args, "--option", f"num_classes={NUM_CLASSES}",
                    "--option", "test_samples_per_class=2"]) == 0
    assert json.loads((tmp_path / "report.json").read_text())["num_images"] == 2 * NUM_CLASSES


def test_report_skips_unreadable_images(bare_checkpoint: Path, images: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "folder-set"
    for split in ("train", "test"):
        for folder in sorted(p for p in images.iterdir() if p.is_dir()):
            shutil.copytree(folder, root / split / folder.name)
    bad = next((root / "test").iterdir()) / "broken.jpg"
    shutil.copyfile(images / "bad.jpg", bad)
    out = tmp_path / "report"
    code = run_cli(["report", str(bare_checkpoint), "--data", "folder", "--root", str(root),
                    "--out", str(out), "--quiet"])
    assert code == 0
    # folder classes are sorted by name, the synthetic set's are not: the user is told
    assert "class names differ" in capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["num_images"] == NUM_CLASSES and report["num_skipped"] == 1
    assert str(bad) in report["skipped"][0]
    assert "broken.jpg" in (out / "report.md").read_text()


def test_expected_calibration_error_matches_torchmetrics() -> None:
    generator = torch.Generator().manual_seed(0)
    probs = torch.randn(500, 7, generator=generator).mul(2).softmax(dim=1)
    targets = torch.randint(0, 7, (500,), generator=generator)
    ours = expected_calibration_error(probs, targets, n_bins=15)
    reference = MulticlassCalibrationError(num_classes=7, n_bins=15, norm="l1")(probs, targets)
    assert ours["ece"] == pytest.approx(float(reference), abs=1e-6)
    assert sum(b["count"] for b in ours["bins"]) == 500
    # The bins drawn in the reliability diagram are the ones torchmetrics' ECE sums over.
    from_bins = sum(b["count"] / 500 * abs(b["accuracy"] - b["confidence"])
                    for b in ours["bins"] if b["count"])
    assert from_bins == pytest.approx(float(reference), abs=1e-6)


def test_plain_cam_explains_the_last_stage(plain_checkpoint: Path, images: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("pytorch_grad_cam", reason="grad-cam is not installed")
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    plain = load_model(plain_checkpoint)
    image = sorted(images.rglob("*.png"))[0]
    x = plain.transform(Image.open(image).convert("RGB"))[None]
    (ours,) = gradcam_maps(plain, x, 1)

    class Logits(torch.nn.Module):
        def __init__(self, net: CRASMRANet) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x).logits[0]

    # ResNet's forward_features ends with layer4, so pytorch-grad-cam on it is the reference.
    with GradCAM(model=Logits(plain), target_layers=[plain.backbone.model.layer4]) as cam:
        theirs = cam(input_tensor=x, targets=[ClassifierOutputTarget(1)])[0]
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
    with torch.inference_mode(), record_channel_importance(plain.attention) as records:
        plain(x)
    assert channel_importance(records) is None

    out = tmp_path / "cam"
    assert run_cli(["cam", str(plain_checkpoint), str(image), "--out", str(out),
                    "--device", "cpu"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [f"{image.stem}_cam.png"]
    width, height = _png_size(out / f"{image.stem}_cam.png")
    assert height > 0.6 * width  # two columns (input + the last stage) by two rows
    capsys.readouterr()
    assert run_cli(["cam", str(plain_checkpoint), str(image), "--out", str(out),
                    "--train-maps"]) == 2
    err = capsys.readouterr().err
    assert "no SMRAM weights" in err.strip().splitlines()[-1] and "Traceback" not in err
