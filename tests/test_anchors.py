"""The anchors benchmark (benchmarks/ncm_probe.py): nearest class mean, centred NCM, probe."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from data_fixtures import jpeg_bytes

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import ncm_probe  # noqa: E402
from crasmra.finetune import probe as probe_module  # noqa: E402


def gaussians(
    classes: int, per_class: int, dim: int = 16, *, seed: int = 0, spread: float = 0.3,
    offset: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Well separated class clusters: ``(train, labels, class centres)``."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g) * 3
    y = torch.arange(classes).repeat_interleave(per_class)
    x = centres[y] + spread * torch.randn(len(y), dim, generator=g) + offset
    return x, y, centres


def split_pair(per_class_train: int, per_class_test: int = 10, classes: int = 5, **kw):
    x, y, _ = gaussians(classes, per_class_train + per_class_test, **kw)
    is_train = (torch.arange(len(y)) % (per_class_train + per_class_test)) < per_class_train
    return x[is_train], y[is_train], x[~is_train], y[~is_train]


def test_separable_gaussians_every_method_is_near_perfect() -> None:
    train, train_y, test, test_y = split_pair(20, offset=5.0)
    accuracy, probes = ncm_probe.anchors(
        {"a": train, "b": train * 2}, train_y, {"a": test, "b": test * 2}, test_y
    )
    for key in ("a", "b"):
        assert set(accuracy[key]) == set(ncm_probe.METHODS)
        for method, value in accuracy[key].items():
            assert value >= 0.98, (key, method, value)
        assert probes[key].choice.selection == "holdout"
        assert probes[key].choice.decay in ncm_probe.DECAY_GRID
        assert 0 < probes[key].iterations <= ncm_probe.PROBE_MAX_ITER


def test_chance_level_on_features_without_class_signal() -> None:
    g = torch.Generator().manual_seed(1)
    train, test = torch.randn(100, 8, generator=g), torch.randn(200, 8, generator=g)
    train_y, test_y = torch.arange(100) % 4, torch.arange(200) % 4
    result = ncm_probe.linear_probe(train, train_y, test, test_y)
    assert result.accuracy < 0.45  # chance is 0.25: the probe does not see the test labels
    assert ncm_probe.ncm_accuracy(train, train_y, test, test_y) < 0.45


def test_centred_ncm_subtracts_the_mean_training_feature() -> None:
    # Class 0 at (1, 0), class 1 at (3, 1); training mean (2, 0.5). The test point (2.5, 0.2)
    # is closer in angle to class 0, but after centring, (0.5, -0.3) points to class 1.
    train = torch.tensor([[1.0, 0.0], [3.0, 1.0]])
    train_y = torch.tensor([0, 1])
    test, test_y = torch.tensor([[2.5, 0.2]]), torch.tensor([0])
    assert ncm_probe.ncm_accuracy(train, train_y, test, test_y) == 1.0
    assert ncm_probe.ncm_accuracy(train, train_y, test, test_y, center=True) == 0.0
    mean = train.mean(dim=0)
    assert ncm_probe.ncm_accuracy(
        train - mean, train_y, test - mean, test_y
    ) == ncm_probe.ncm_accuracy(train, train_y, test, test_y, center=True)


def test_the_fit_is_deterministic_and_the_decay_shrinks_the_weights() -> None:
    train, train_y, _, _ = split_pair(10)
    a = ncm_probe.fit_logreg(train, train_y, 5, 1e-3)
    b = ncm_probe.fit_logreg(train, train_y, 5, 1e-3)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    strong = ncm_probe.fit_logreg(train, train_y, 5, 1e-1)
    assert strong.weight.norm() < a.weight.norm()
    # The probe reads L2-normalised features: scaling the input changes nothing.
    assert torch.allclose(ncm_probe.fit_logreg(train * 7, train_y, 5, 1e-3).weight, a.weight)


def test_the_decay_is_chosen_on_training_features_only(monkeypatch: pytest.MonkeyPatch) -> None:
    train, train_y, test, test_y = split_pair(10, offset=1.0)
    test = test + 1000.0  # test rows are recognisable: no training row is this far out
    seen: list[torch.Tensor] = []
    fit = ncm_probe.fit_logreg

    def spy(x, y, *args, **kwargs):
        seen.append(x)
        return fit(x, y, *args, **kwargs)

    monkeypatch.setattr(ncm_probe, "fit_logreg", spy)
    # The decay's selection fits through the package's own probe module.
    monkeypatch.setattr(probe_module, "fit_logreg", spy)
    result = ncm_probe.linear_probe(train, train_y, test, test_y)
    # One fit per candidate decay on the training part of the hold-out, then the refit.
    assert len(seen) == len(ncm_probe.DECAY_GRID) + 1
    for x in seen:
        assert (x.abs() < 500).all()  # no test row was ever fitted on
        rows = {tuple(r.tolist()) for r in train}
        assert all(tuple(r.tolist()) in rows for r in x)
    assert len(seen[0]) < len(train) and len(seen[-1]) == len(train)
    # The hold-out is a seeded stratified share of the training photos (2 of 10 per class).
    assert result.choice.selection == "holdout"
    assert result.choice.holdout_images == 5 * 2
    assert set(result.choice.holdout_accuracy) == set(ncm_probe.DECAY_GRID)

    # And the choice does not move when the test split changes.
    monkeypatch.setattr(ncm_probe, "fit_logreg", fit)
    other = ncm_probe.linear_probe(train, train_y, -test, torch.flip(test_y, [0]))
    assert other.choice == result.choice


def test_select_decay_takes_no_test_features() -> None:
    import inspect

    params = inspect.signature(ncm_probe.select_decay).parameters
    assert not any("test" in name for name in params)


def test_a_single_training_photo_falls_back_to_the_fixed_decay(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    train, train_y, test, test_y = split_pair(1, offset=2.0)
    calls: list[float] = []
    fit = ncm_probe.fit_logreg

    def spy(x, y, num_classes, decay, **kwargs):
        calls.append(decay)
        return fit(x, y, num_classes, decay, **kwargs)

    monkeypatch.setattr(ncm_probe, "fit_logreg", spy)
    # The decay's selection fits through the package's own probe module.
    monkeypatch.setattr(probe_module, "fit_logreg", spy)
    result = ncm_probe.linear_probe(train, train_y, test, test_y)
    assert calls == [ncm_probe.FALLBACK_DECAY] == [1e-3]  # no hold-out fits at all
    assert result.choice.selection == "fixed"
    assert result.choice.decay == 1e-3
    assert "single training photo" in result.choice.reason
    assert result.choice.holdout_accuracy is None
    assert result.accuracy >= 0.9

    # One short class is enough to make the hold-out impossible.
    train2, train_y2, _, _ = split_pair(4)
    keep = torch.ones(len(train_y2), dtype=torch.bool)
    keep[(train_y2 == 2).nonzero()[1:]] = False
    choice = ncm_probe.select_decay(train2[keep], train_y2[keep], 5, fallback_decay=0.05)
    assert (choice.selection, choice.decay) == ("fixed", 0.05)
    assert choice.reason.startswith("1 class(es)")


def test_markdown_table_lists_every_feature_and_method() -> None:
    choice = ncm_probe.DecayChoice(1e-3, "fixed", reason="x")
    table = ncm_probe.markdown(
        {"prelogits": {"ncm": 0.5, "ncm_centered": 0.625, "linear_probe": 0.75}},
        {"prelogits": choice},
        {"prelogits": 1280},
    )
    lines = table.splitlines()
    assert lines[0] == "| feature | dim | ncm | ncm_centered | linear_probe | probe decay |"
    assert lines[2] == "| prelogits | 1280 | 50.0% | 62.5% | 75.0% | 0.001 (fixed) |"


def _folder(root: Path, train: int, test: int) -> Path:
    colours = {"ant": (200, 30, 30), "bee": (30, 200, 30), "cat": (30, 30, 200)}
    for split, n in (("train", train), ("test", test)):
        for cls, colour in colours.items():
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                shade = tuple(min(255, c + 8 * i) for c in colour)
                (folder / f"{i}.jpg").write_bytes(jpeg_bytes((40, 40), shade))
    return root


def test_main_writes_the_table_and_the_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import timm
    from safetensors.torch import save_file

    weights = tmp_path / "w.safetensors"
    torch.manual_seed(0)
    save_file(timm.create_model("resnet10t", pretrained=False).state_dict(), str(weights))
    root = _folder(tmp_path / "data", train=4, test=2)
    out = tmp_path / "anchors" / "a.json"
    common = ["--dataset", "folder", "--root", str(root), "--backbone", "resnet10t",
              "--pretrained", str(weights), "--image-size", "32", "--resize-size", "32",
              "--threads", "1", "--probe-max-iter", "50"]
    assert ncm_probe.main([*common, "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| feature | dim | ncm | ncm_centered | linear_probe | probe decay |" in printed
    data = json.loads(out.read_text())
    features = ("prelogits", "stage3", "stage4", "stage5")
    for key in features:  # the NCM-only version's keys
        assert data[key] == data["accuracy"][key]["ncm"]
        assert set(data["accuracy"][key]) == set(ncm_probe.METHODS)
        assert data["linear_probe"][key]["selection"] == "holdout"
    assert (data["train_images"], data["test_images"]) == (12, 6)
    assert data["settings"]["train_per_class"] is None

    # The few-shot subset: the same photos --data.train_per_class trains on.
    out1 = tmp_path / "anchors" / "k1.json"
    assert ncm_probe.main([*common, "--train-per-class", "1", "--subset-seed", "2",
                           "--json", str(out1)]) == 0
    printed = capsys.readouterr().out
    assert "single training photo" in printed
    k1 = json.loads(out1.read_text())
    assert k1["train_images"] == 3
    assert (k1["settings"]["train_per_class"], k1["settings"]["subset_seed"]) == (1, 2)
    assert k1["linear_probe"]["prelogits"]["selection"] == "fixed"
    assert k1["linear_probe"]["prelogits"]["decay"] == ncm_probe.FALLBACK_DECAY

    # --json alone: one JSON line on stdout, as before.
    assert ncm_probe.main([*common, "--train-per-class", "2", "--json"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["train_images"] == 6 and "prelogits" in line
