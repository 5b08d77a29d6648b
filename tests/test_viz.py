"""`crasmra cam` (Grad-CAM / activation / SMRAM grids, CRAM importance) and `crasmra report`."""

from __future__ import annotations

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
from crasmra.errors import MissingExtraError
from crasmra.inference import expected_calibration_error, load_model
from crasmra.layers import record_channel_importance
from crasmra.model import CRASMRANet
from crasmra.outputs import ModelOutput
from crasmra.viz import (
    activation_maps,
    channel_importance,
    explain_image,
    gradcam_maps,
    stage_gradcams,
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


def test_gradcam_without_the_package_names_the_extra(model: CRASMRANet,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pytorch_grad_cam", None)
    with pytest.raises(MissingExtraError, match=r'pip install "crasmra\[viz\]"'):
        gradcam_maps(model, torch.zeros(1, 3, 64, 64), 0)


def test_cam_without_the_viz_extra_is_one_line_for_both_installs(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setitem(sys.modules, "pytorch_grad_cam", None)
    images = write_images(tmp_path / "images")
    image = next(images.rglob("*.png"))
    out = tmp_path / "cam"
    code = run_cli(["cam", str(tiny_checkpoint), str(image), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert "Traceback" not in err and len(errors) == 1 and errors[0].startswith("crasmra: error:")
    assert "Grad-CAM needs the grad-cam package" in errors[0]
    # The command that works for a registry install and the one for a clone of the repository.
    assert 'pip install "crasmra[viz]"' in err and 'pip install -e ".[viz]"' in err
    assert not any(p.suffix == ".png" for p in out.rglob("*"))


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
    # An attention module registered by an installed package may name no layer for x_e.
    reference = library_gradcam(net, x, predicted)
    for ours, theirs in zip(maps, reference or maps, strict=True):
        np.testing.assert_allclose(ours, theirs, atol=1e-4)
    result = explain_image(net, image, tmp_path, name="x")
    assert result.grid.is_file() and result.predicted == net.classes[predicted]


def _concat_head(output: ModelOutput, stage: int) -> torch.Tensor:
    assert output.concat_logits is not None
    return output.concat_logits


@pytest.mark.parametrize("attention", [SCALE, "cram"])
def test_each_stage_map_explains_its_own_head_for_the_asked_class(
    attention: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    net = attention_network(attention, seed=1)
    x = torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    classes = range(net.num_classes)
    runs = []
    real = net.forward_features

    def counted(images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        runs.append(images.requires_grad or torch.is_grad_enabled())
        return real(images)

    with monkeypatch.context() as patch:
        patch.setattr(net, "forward_features", counted)
        ours = [stage_gradcams(net, x, c).maps for c in classes]
    assert runs == [False] * len(classes)  # one backbone pass per image, without a graph
    own = [library_gradcam(net, x, c) for c in classes]
    concat = [library_gradcam(net, x, c, head=_concat_head) for c in classes]
    for c in classes:
        for i in range(len(net.attention)):
            np.testing.assert_allclose(ours[c][i], own[c][i], atol=1e-4, err_msg=f"{c=} {i=}")

    def differ(a: np.ndarray, b: np.ndarray) -> bool:
        return not np.allclose(a, b, atol=1e-2)

    # The comparison tells the wrong head (the concat head, which also reads every x_e), the
    # wrong class and the wrong stage from the right ones on this network and image.
    n = len(net.attention)
    for i in range(n):
        assert any(differ(own[c][i], concat[c][i]) for c in classes), i
        assert any(differ(own[c][i], own[0][i]) for c in classes[1:]), i
        assert all(any(differ(own[c][i], own[c][j]) for c in classes)
                   for j in range(n) if j != i), i


def test_a_module_whose_head_map_is_not_a_map_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    net = attention_network(SCALE)
    real = net.forward_features

    def flat(x: torch.Tensor) -> list[torch.Tensor]:
        return [f.mean(dim=(2, 3)) for f in real(x)]

    monkeypatch.setattr(net, "forward_features", flat)
    with pytest.raises(ValueError, match=r"stage3 \(ScaleAttention\).*\(x_e, x_s\)"):
        gradcam_maps(net, torch.zeros(1, 3, SIZE, SIZE), 0)


@pytest.mark.parametrize("frozen", [False, True])
def test_a_head_that_does_not_read_the_map_is_named(frozen: bool,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    net = attention_network(SCALE).requires_grad_(not frozen)
    real = net.forward_heads

    def cut(features: list[torch.Tensor]) -> ModelOutput:
        # stage4's head reads a copy of its map cut from the graph, not the map itself
        return real([f.detach() if i == 1 else f for i, f in enumerate(features)])

    monkeypatch.setattr(net, "forward_heads", cut)
    with pytest.raises(ValueError, match=r"head of stage4 \(ScaleAttention\) does not read"):
        gradcam_maps(net, torch.randn(1, 3, SIZE, SIZE), 0)
    assert all(p.grad is None for p in net.parameters())


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
