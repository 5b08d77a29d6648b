"""Loading checkpoints and `crasmra predict`: formats, inputs, bad files, bad checkpoints."""

from __future__ import annotations

import csv
import io
import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

import crasmra
from conftest import run_cli
from crasmra.checkpoint import CheckpointError, network_state_dict
from crasmra.data import SyntheticFGVC
from crasmra.inference import find_images, load_model, predict
from crasmra.model import CRASMRANet, PlainNet

NUM_CLASSES = 4  # tests/configs/tiny.yaml


def write_images(root: Path) -> Path:
    """One 64 px synthetic image per class in ``root/<class>/``, plus a corrupt ``bad.jpg``."""
    ds = SyntheticFGVC("test", num_classes=NUM_CLASSES, test_samples_per_class=1, image_size=64)
    for i in range(len(ds)):
        image, label = ds[i]
        folder = root / ds.classes[label]
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"img{i}.png")
    (root / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    return root


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_images(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def model(tiny_checkpoint: Path) -> CRASMRANet:
    return load_model(tiny_checkpoint)


@pytest.fixture(scope="module")
def inference_ckpt(tiny_checkpoint: Path) -> dict[str, Any]:
    """The checkpoint reduced to what inference reads (small and quick to re-save)."""
    ckpt = torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)
    return {"state_dict": ckpt["state_dict"], "crasmra": ckpt["crasmra"]}


def test_load_model_rebuilds_the_eval_network(model: CRASMRANet, tiny_checkpoint: Path,
                                              images: Path) -> None:
    ckpt = torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)
    assert isinstance(model, CRASMRANet) and not model.training
    assert model.classes == ckpt["crasmra"]["classes"] and len(model.classes) == NUM_CLASSES
    assert model.checkpoint_path == str(tiny_checkpoint)
    # exactly the training run's network weights; SMRAM (training only) is left out
    state = model.state_dict()
    assert state.keys() == network_state_dict(ckpt, tiny_checkpoint).keys()
    assert not any("smram" in k for k in state)
    for key, value in state.items():
        assert torch.equal(value, ckpt["state_dict"][f"net.{key}"]), key
    x = model.transform(crasmra.data.load_image(next(images.rglob("*.png"))))
    assert x.shape == (3, 64, 64)
    with torch.inference_mode():
        probs = model(x[None]).probs
    assert probs.shape == (1, NUM_CLASSES) and math.isclose(float(probs.sum()), 1.0, rel_tol=1e-5)
    assert crasmra.load_model is load_model


def test_find_images_expands_folders_and_globs(images: Path) -> None:
    pngs = sorted(images.rglob("*.png"))
    files, failures = find_images([images, str(images / "*" / "img0.png"), pngs[0], "missing.png",
                                   str(images / "*.tif")])
    # the folder gives every image, sorted; the glob and the file only repeat images already
    # found, so nothing is listed twice
    assert files == sorted([*pngs, images / "bad.jpg"])
    assert [f.path for f in failures] == ["missing.png", str(images / "*.tif")]


def test_predict_skips_unreadable_images(model: CRASMRANet, images: Path) -> None:
    good = sorted(images.rglob("*.png"))
    seen: list[tuple[int, int]] = []
    result = predict(model, [good[0], images / "bad.jpg", *good[1:]], top_k=10, batch_size=2,
                     progress=lambda done, total: seen.append((done, total)))
    assert [p.path for p in result.predictions] == [str(p) for p in good]
    assert [f.path for f in result.failures] == [str(images / "bad.jpg")]
    assert "image" in result.failures[0].reason  # e.g. "corrupt or truncated image (...)"
    assert seen[-1] == (NUM_CLASSES + 1, NUM_CLASSES + 1)
    for pred in result.predictions:
        assert len(pred.indices) == NUM_CLASSES  # top-k capped at the number of classes
        assert pred.probabilities == sorted(pred.probabilities, reverse=True)
        assert math.isclose(sum(pred.probabilities), 1.0, rel_tol=1e-5)
        assert pred.labels == [model.classes[i] for i in pred.indices]


def test_predict_command_formats(tiny_checkpoint: Path, images: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    args = ["predict", str(tiny_checkpoint), str(images), "--top-k", "2", "--quiet"]
    assert run_cli([*args, "--format", "json"]) == 0
    captured = capsys.readouterr()
    data = json.loads(captured.out)
    assert len(data["predictions"]) == NUM_CLASSES
    assert all(len(p["top_k"]) == 2 for p in data["predictions"])
    assert data["failures"][0]["path"].endswith("bad.jpg")
    assert "bad.jpg" in captured.err  # reported on stderr as well

    assert run_cli([*args, "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(rows) == 2 * NUM_CLASSES
    assert {r["rank"] for r in rows} == {"1", "2"}

    pattern = str(images / "*" / "*.png")
    assert run_cli(["predict", str(tiny_checkpoint), pattern, "--batch-size", "3"]) == 0
    table = capsys.readouterr().out
    assert table.count("  1. ") == NUM_CLASSES and "%" in table


def test_predict_command_with_no_readable_image(tiny_checkpoint: Path, images: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(["predict", str(tiny_checkpoint), str(images / "bad.jpg")]) == 1
    assert "no image could be read" in capsys.readouterr().err


def test_truncated_checkpoint_gives_a_clear_error(tiny_checkpoint: Path, images: Path,
                                                  tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    data = tiny_checkpoint.read_bytes()
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(data[: len(data) // 2])
    assert run_cli(["predict", str(truncated), str(images)]) == 2
    err = capsys.readouterr().err
    assert "truncated or corrupt" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1

    empty = tmp_path / "empty.ckpt"
    empty.touch()
    with pytest.raises(CheckpointError, match="empty"):
        load_model(empty)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_model(tmp_path / "missing.ckpt")


def _tamper_classes(ckpt: dict[str, Any]) -> None:
    ckpt["crasmra"]["classes"] = ckpt["crasmra"]["classes"][:-1]


def _tamper_head(ckpt: dict[str, Any]) -> None:
    sd = ckpt["state_dict"]
    key = next(k for k in sd if k.startswith("net.concat_head.mlp.4.weight"))
    sd[key] = torch.zeros(NUM_CLASSES + 3, sd[key].shape[1])
    sd[key.replace("weight", "bias")] = torch.zeros(NUM_CLASSES + 3)


def _tamper_missing(ckpt: dict[str, Any]) -> None:
    del ckpt["state_dict"][next(k for k in ckpt["state_dict"] if k.startswith("net.heads.0"))]


def _tamper_nan(ckpt: dict[str, Any]) -> None:
    key = next(k for k in ckpt["state_dict"] if k.endswith("conv1.weight"))
    ckpt["state_dict"][key] = torch.full_like(ckpt["state_dict"][key], float("nan"))


def _foreign(ckpt: dict[str, Any]) -> None:
    del ckpt["crasmra"]


def _newer_format(ckpt: dict[str, Any]) -> None:
    ckpt["crasmra"]["format_version"] = 99


def _unknown_hparam(ckpt: dict[str, Any]) -> None:
    ckpt["crasmra"]["net_config"] = {**ckpt["crasmra"]["net_config"], "new_option": 1}


@pytest.mark.parametrize(("tamper", "message"), [
    (_tamper_classes, "lists 3 class names"),
    (_tamper_head, "classifier weights for 7 classes"),
    (_tamper_missing, "1 missing"),
    (_tamper_nan, "non-finite"),
    (_foreign, "not written by crasmra"),
    (_newer_format, "newer than this crasmra"),
    (_unknown_hparam, "cannot build"),
])
def test_tampered_or_foreign_checkpoint_is_refused(inference_ckpt: dict[str, Any], tamper: Any,
                                                   message: str, tmp_path: Path) -> None:
    ckpt = {"state_dict": dict(inference_ckpt["state_dict"]),
            "crasmra": dict(inference_ckpt["crasmra"])}
    tamper(ckpt)
    path = tmp_path / "tampered.ckpt"
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match=message):
        load_model(path)


def test_pickled_objects_are_never_loaded(tmp_path: Path) -> None:
    path = tmp_path / "pickled.ckpt"
    torch.save({"state_dict": {}, "callback": shutil.copyfile}, path)
    with pytest.raises(CheckpointError, match="weights-only load refuses"):
        load_model(path)


def test_checkpoint_for_another_class_count(tiny_checkpoint: Path) -> None:
    with pytest.raises(CheckpointError, match=f"trained for {NUM_CLASSES} classes, but 5"):
        load_model(tiny_checkpoint, num_classes=5)


def test_plain_checkpoint_loads_predicts_and_reports(plain_checkpoint: Path, images: Path,
                                                     tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    model = load_model(plain_checkpoint)
    assert model.variant == "plain" and model.head_names == ("classifier",)
    assert isinstance(model, PlainNet) and len(model.classes) == NUM_CLASSES
    result = predict(model, [images], top_k=2)
    assert len(result.predictions) == NUM_CLASSES and len(result.failures) == 1
    with torch.inference_mode():
        x = model.transform(Image.open(sorted(images.rglob("*.png"))[0]).convert("RGB"))
        out = model(x[None])
    torch.testing.assert_close(out.probs, out.logits[0].softmax(dim=-1))

    args = ["predict", str(plain_checkpoint), str(images), "--format", "json", "--quiet"]
    assert run_cli(args) == 0
    assert len(json.loads(capsys.readouterr().out)["predictions"]) == NUM_CLASSES
    assert run_cli(["report", str(plain_checkpoint), "--out", str(tmp_path / "r"), "--quiet"]) == 0
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert list(report["heads"]) == ["classifier", "combined"]
    assert report["heads"]["classifier"] == report["heads"]["combined"]
    assert "| classifier |" in (tmp_path / "r" / "report.md").read_text()

    # A classifier for another class count than the metadata says is named as such.
    ckpt = torch.load(plain_checkpoint, map_location="cpu", weights_only=True)
    state = dict(ckpt["state_dict"])
    state["net.backbone.model.fc.weight"] = torch.zeros(7, state["net.backbone.model.fc.weight"]
                                                        .shape[1])
    tampered = tmp_path / "tampered.ckpt"
    torch.save({"state_dict": state, "crasmra": ckpt["crasmra"]}, tampered)
    with pytest.raises(CheckpointError, match="classifier weights for 7 classes"):
        load_model(tampered)
