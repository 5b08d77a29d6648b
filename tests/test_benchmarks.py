"""The benchmark scripts' code paths run and produce their table columns (not timed)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import inference  # noqa: E402
import input_pipeline  # noqa: E402
import run_all  # noqa: E402
import train_step  # noqa: E402
from benchlib import Candidate, markdown_table, time_alternating  # noqa: E402

TINY = train_step.StepConfig(backbone="resnet10t", num_classes=5, size=64, batch=2)


def test_jigsaw_permutes_whole_patches() -> None:
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    y = train_step.jigsaw(x, 2, torch.Generator().manual_seed(1))

    def patches(t: torch.Tensor) -> list[torch.Tensor]:
        return [t[:, :, i : i + 4, j : j + 4] for i in (0, 4) for j in (0, 4)]

    assert y.shape == x.shape
    for p in patches(y):
        assert any(torch.equal(p, q) for q in patches(x))
    assert torch.equal(y.sum(), x.sum())


def test_pmg_step_makes_four_passes_and_updates() -> None:
    step = train_step.TrainStep("pmg", TINY)
    assert len(list(step.passes())) == 4
    before = [p.detach().clone() for p in step.net.parameters()]
    step.step()
    changed = sum(not torch.equal(a, b) for a, b in zip(before, step.net.parameters(), strict=True))
    assert changed > 0


def test_training_table_columns() -> None:
    cands = train_step.build_candidates(["plain", "cra-smra", "pmg"], TINY)
    time_alternating(cands, torch.device("cpu"), warmup=0, iters=1, rounds=1)
    assert all(c.flops > 0 and len(c.times) == 1 for c in cands)
    table = train_step.train_table(cands, peak_tflops=1.0, memory={"plain": 1.0})
    header = table.splitlines()[0]
    for col in ("ms/step", "img/s", "vs plain", "vs PMG", "MFU", "peak mem (MB)"):
        assert col in header
    assert len(table.splitlines()) == 2 + 3


def test_inference_table_columns() -> None:
    cfg = inference.InferConfig(backbone="resnet10t", num_classes=5, size=64)
    cands = inference.build_candidates(cfg, throughput_batch=2)
    time_alternating(cands, torch.device("cpu"), warmup=0, iters=1, rounds=1)
    table = inference.infer_table(cands, peak_tflops=1.0)
    for col in ("latency b1 (ms)", "latency vs plain", "img/s b2", "FLOPs vs plain", "MFU b2"):
        assert col in table.splitlines()[0]
    assert [row.split("|")[1].strip() for row in table.splitlines()[2:]] == ["plain", "cra-smra"]


def test_input_pipeline_paths_agree_in_shape(tmp_path: Path) -> None:
    paths = input_pipeline.make_jpegs(tmp_path, 2)
    for name in input_pipeline.PATHS:
        decode, augment = input_pipeline.pipeline(name)
        out = augment(decode(paths[0]))
        assert out.shape == (3, 448, 448)
        assert out.dtype == (torch.uint8 if name.endswith("-u8") else torch.float32)
    rates = input_pipeline.per_worker_rates(paths, rounds=1)
    table = input_pipeline.pipeline_table(rates, {"train": 100.0})
    assert "img/s per worker" in table and "workers for train" in table
    assert input_pipeline.loader_rate(paths, 0, batch=2, epochs=1) > 0


def test_crop_first_matches_resize_then_crop() -> None:
    # Full-size crop (no slack): both paths are one resize of the whole image.
    img = torch.randint(0, 256, (3, 60, 80), dtype=torch.uint8)
    crop_first = input_pipeline.CropFirst(image_size=40, resize_size=40)
    torch.manual_seed(0)
    a = crop_first(img)
    torch.manual_seed(0)
    b = input_pipeline.tensor_train_transform(image_size=40, resize_size=40)(img)
    assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.slow
def test_run_all_writes_markdown(tmp_path: Path) -> None:
    out = tmp_path / "report.md"
    report = run_all.run([
        "--device", "cpu", "--size", "64", "--batch", "2", "--throughput-batch", "2",
        "--backbones", "resnet10t", "--kinds", "plain,cra-smra", "--parts", "train,infer",
        "--warmup", "0", "--iters", "1", "--rounds", "1", "--peak-tflops", "1",
        "--output", str(out),
    ])
    assert out.read_text().strip() == report.strip()
    assert "### Training step" in report and "### Inference" in report and "MFU" in report


def test_markdown_table_alignment() -> None:
    table = markdown_table(["a", "b"], [["x", "1.5x"]])
    assert table.splitlines()[1] == "| --- | ---: |"
    assert Candidate("c", lambda: None, times=[1.0, 3.0, 2.0]).median == 2.0
