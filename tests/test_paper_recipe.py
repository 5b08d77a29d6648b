"""The paper's recipe and protocol: named ImageNet weights, no validation split, centre crop,
and the two readings of CRAM's X_s. Nothing here downloads: tagged backbone names are built
with ``pretrained=False`` while every network connection is refused."""

from __future__ import annotations

import json
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, TINY_CONFIG, build_module, run_cli, tiny_fit_args
from crasmra import sweep as sw
from crasmra.backbones import StagedBackbone, check_backbone
from crasmra.config import load_config
from crasmra.data import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    FGVCDataModule,
    normalization_for_backbone,
)
from crasmra.demo import format_results_table
from crasmra.model import CRASMRANet, create_model, validate_hparams

TINY = dict(head_channels=16, head_hidden=16)
PAPER_RECIPES = sorted(
    p
    for d in ("cub", "aircraft", "cars", "dogs")
    for p in (REPO / "configs" / d).glob("*.yaml")
    # The Transformer recipes are ours: the paper has none (docs/transformers.md).
    if p.name not in ("dataset.yaml", "swin_base.yaml", "vit_base.yaml")
)
PAPER_SWEEPS = sorted((REPO / "sweeps").glob("paper-*.yaml"))


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Refuse every internet connection and name lookup, and timm's weight loader; the test
    fails if anything tried one."""
    attempts: list[str] = []

    def refuse(what: str):
        def refused(*args: Any, **kwargs: Any) -> Any:
            attempts.append(f"{what}{args[1:2]}")
            raise OSError(f"{what}: no network in tests")

        return refused

    real_connect = socket.socket.connect

    def connect(sock: socket.socket, address: Any) -> Any:
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            return refuse("connect")(sock, address)
        return real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "getaddrinfo", refuse("getaddrinfo"))
    monkeypatch.setattr(socket, "create_connection", refuse("create_connection"))
    monkeypatch.setattr("timm.models._builder.load_pretrained", refuse("load_pretrained"))
    yield attempts
    assert attempts == [], f"network or weight downloads were attempted: {attempts}"


def _photo(seed: int, h: int = 60, w: int = 80) -> Image.Image:
    # Noise: any shift of the crop window changes the pixels.
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


# ---- 1. pretrained weights: the recipes name torchvision's; any timm tag works -------------------


def test_paper_recipes_name_torchvision_weights_and_follow_the_paper(no_network) -> None:
    assert len(PAPER_RECIPES) >= 4 * 6  # 3 backbones and 3 ablations per dataset, at least
    for path in PAPER_RECIPES:
        config = load_config(path)
        backbone = config["model"]["net"]["backbone"]
        assert backbone == path.stem.split("-")[0] + ".tv_in1k", path
        data = config["data"]
        assert data["val_fraction"] == 0 and data["random_crop"] is False, path
        assert (data["image_size"], data["resize_size"], data["hflip"]) == (448, 550, True)
        assert config["model"]["net"]["pretrained"] is True
    for name in ("resnet50.tv_in1k", "resnet101.tv_in1k", "densenet161.tv_in1k"):
        assert check_backbone(name) == (check_backbone(name.split(".")[0]))


def test_paper_sweeps_run_the_tagged_backbones(no_network) -> None:
    assert len(PAPER_SWEEPS) == 4
    for path in PAPER_SWEEPS:
        spec = sw.load_sweep(path)
        assert spec.defaults["model.net.backbone"] == "resnet50.tv_in1k"
        grid = next(g for g in spec.grids if g.name == "backbones")
        backbones = grid.values["model.net.backbone"]
        assert backbones == ["resnet50.tv_in1k", "resnet101.tv_in1k", "densenet161.tv_in1k"]
        runs, rows = sw.plan_runs(spec)
        folders = [name for _, name in rows["backbones"]]
        assert all(f.startswith(f"backbone={b}") for f, b in zip(folders, backbones, strict=True))
        built = [r.fit_config(spec.base, Path("out"))["model"]["net"]["backbone"] for r in runs]
        for b in backbones:
            assert b in built


def test_a_tagged_backbone_builds_everywhere_offline(no_network) -> None:
    name = "resnet10t.c3_in1k"
    assert check_backbone(name) == (2, 3, 4)
    assert validate_hparams(name, 3)["backbone"] == name
    net = create_model(name, 3, pretrained=False, **TINY).eval()
    assert net.config["backbone"] == name
    rebuilt = CRASMRANet(**net.config).eval()  # what loading a checkpoint does
    rebuilt.load_state_dict(net.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x).probs, net(x).probs)
    assert net.data_config["mean"] == IMAGENET_DEFAULT_MEAN
    # The tag's own normalisation is what the data module uses.
    assert normalization_for_backbone("resnet50.tv_in1k") == (
        IMAGENET_DEFAULT_MEAN,
        IMAGENET_DEFAULT_STD,
    )
    bit = normalization_for_backbone("resnetv2_50x1_bit.goog_in21k")
    assert bit == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    dm = FGVCDataModule("synthetic", num_workers=0, backbone="resnetv2_50x1_bit.goog_in21k")
    assert dm.transform_config["mean"] == [0.5, 0.5, 0.5]


def test_an_unknown_pretrained_tag_is_a_clear_error(no_network) -> None:
    with pytest.raises(ValueError, match=r"Unknown pretrained tag 'tv_in1kk'.*'tv_in1k'"):
        check_backbone("resnet50.tv_in1kk")
    with pytest.raises(ValueError, match="Unknown pretrained tag"):
        create_model("resnet10t.in1k", 3)


def test_pretrained_true_loads_the_named_tag(
    no_network, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    loaded: list[str] = []

    def load_pretrained(model: torch.nn.Module, *args: Any, **kwargs: Any) -> None:
        cfg = model.pretrained_cfg
        loaded.append(f"{cfg['architecture']}.{cfg['tag']}")

    monkeypatch.setattr("timm.models._builder.load_pretrained", load_pretrained)
    caplog.set_level("INFO", logger="crasmra.backbones")
    StagedBackbone("resnet18.tv_in1k", pretrained=True)
    StagedBackbone("resnet18", pretrained=True)
    # A bare name takes timm's default tag, which is not torchvision's for ResNets.
    assert loaded == ["resnet18.tv_in1k", "resnet18.a1_in1k"]
    assert "Backbone weights: timm's resnet18.tv_in1k" in caplog.text


def test_cost_benchmark_takes_a_tagged_backbone(
    no_network, capsys: pytest.CaptureFixture[str]
) -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import cost
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    cost.main(["--backbone", "resnet10t.c3_in1k", "--size", "32", "--num-classes", "3",
               "--head-channels", "16"])
    out = capsys.readouterr().out
    assert out.startswith("resnet10t.c3_in1k @ 32x32") and "| cra-smra |" in out


# ---- 2. protocol: the whole training split, the final epoch --------------------------------------


def test_fit_without_validation_tests_the_final_epoch(
    no_network, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    flags = ("--data.val_fraction=0", "--model.net.backbone=resnet10t.c3_in1k")
    assert run_cli(tiny_fit_args(tmp_path, *flags, "--trainer.max_epochs=1")) == 0
    assert "No validation split: best.ckpt is the final epoch" in capsys.readouterr().err
    # Resumed to a second epoch: best.ckpt follows the final epoch again.
    assert run_cli(tiny_fit_args(tmp_path, *flags, "--trainer.max_epochs=2",
                                 "--ckpt_path=last")) == 0
    best_path = tmp_path / "checkpoints" / "best.ckpt"
    best = torch.load(best_path, map_location="cpu", weights_only=True)
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu",
                      weights_only=True)
    assert best["epoch"] == last["epoch"] == 1 and best["global_step"] == last["global_step"]
    for key, value in last["state_dict"].items():
        torch.testing.assert_close(best["state_dict"][key], value)
    (state,) = (v for k, v in best["callbacks"].items() if k.startswith("ModelCheckpoint"))
    assert state["monitor"] is None

    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["selection"]["rule"] == "final_epoch"
    assert "best_val" not in metrics and "last_val" not in metrics
    assert metrics["epochs_completed"] == 2
    assert metrics["test_checkpoint"] == str(best_path)
    assert "test/combined_top1" in metrics["test"]
    assert not any(k.startswith("val/") for k in metrics["test"])
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0]
    assert "val/" not in header

    # The demo's table and a sweep's table leave out the val column.
    table = format_results_table(tmp_path / "metrics.json", 4)
    assert table.splitlines()[0].split() == ["head", "test", "top-1", "chance"]
    assert table.splitlines()[-1].startswith("combined")
    grid = {"keys": ["model.net.delta"], "name": "delta", "title": "delta",
            "rows": [{"label": "0.9", "point": {"model.net.delta": 0.9}, "setting": "delta=0.9",
                      "metrics": sw.aggregate({0: dict(metrics["test"])})}]}
    markdown = sw.format_markdown({"title": "t", "description": "", "seeds": [0],
                                   "runs_planned": 1, "runs_finished": 1, "grids": [grid]})
    assert "| delta | stage3 (test) |" in markdown and "(val)" not in markdown
    assert "final epoch" in markdown

    # `validate` has nothing to evaluate and says what to add.
    capsys.readouterr()
    code = run_cli(["validate", f"--config={TINY_CONFIG}", "--data.val_fraction=0",
                    f"--trainer.default_root_dir={tmp_path}"])
    assert code == 2 and "--data.val_fraction 0.1" in capsys.readouterr().err


# ---- 3. crop: centre crop in training, in both decode paths --------------------------------------


@pytest.mark.parametrize("backend", ["pil", "tensor"])
def test_training_takes_the_centre_crop_by_default(backend: str) -> None:
    options = {"num_classes": 2, "samples_per_class": 2, "native_size": 48}
    dm = FGVCDataModule("synthetic", num_workers=0, image_size=32, resize_size=40, hflip=False,
                        decode_backend=backend, options=options)
    assert dm.random_crop is False
    img = _photo(0)
    if backend == "tensor":
        img = torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous()
    train, evaluate = dm.build_transform(True), dm.build_transform(False)
    torch.manual_seed(0)
    first = train(img)
    torch.manual_seed(1)
    assert torch.equal(train(img), first)  # no random window
    if backend == "pil":
        assert torch.equal(first, evaluate(img))  # exactly the evaluation crop
    else:
        # The tensor path resizes only the window: the same pixels up to interpolation at
        # its edges (normalised units; 0.1 is about 6 grey levels).
        assert (first - evaluate(img)).abs().mean() < 0.1
    random_dm = FGVCDataModule("synthetic", num_workers=0, image_size=32, resize_size=40,
                               hflip=False, random_crop=True, decode_backend=backend,
                               options=options)
    crops = set()
    for seed in range(8):
        torch.manual_seed(seed)
        crops.add(random_dm.build_transform(True)(img).sum().item())
    assert len(crops) > 1


# ---- 4. X_s: the engine passes the switch on -----------------------------------------------------


def test_engine_passes_suppress_source_to_every_cram(no_network) -> None:
    module = build_module(backbone="resnet10t.c3_in1k", num_classes=3,
                           suppress_source="enhanced", **TINY)
    assert module.net_config.suppress_source == "enhanced"
    assert module.hparams["net"]["suppress_source"] == "enhanced"
    assert [a.suppress_source for a in module.net.attention] == ["enhanced"] * 3
    assert module.net.config["suppress_source"] == "enhanced"
    assert build_module(backbone="resnet10t", num_classes=3, **TINY).net.attention[
        0
    ].suppress_source == "input"
    with pytest.raises(ValueError, match="suppress_source"):
        build_module(backbone="resnet10t", num_classes=3, suppress_source="mask", **TINY)
