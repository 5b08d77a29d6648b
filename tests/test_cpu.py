"""CPU budget: cgroup quotas, affinity, and the split between threads and loader workers."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from conftest import REPO, build_module
from crasmra import cpu
from crasmra.cpu import CPUPlan, cgroup_cpu_limit, configure_cpu, plan_cpu, usable_cpus


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v2_quota_is_read_along_the_path(tmp_path: Path) -> None:
    proc = tmp_path / "proc_cgroup"
    _write(proc, "0::/jobs/one\n")
    _write(tmp_path / "fs/cpu.max", "max 100000\n")
    _write(tmp_path / "fs/jobs/cpu.max", "300000 100000\n")
    _write(tmp_path / "fs/jobs/one/cpu.max", "150000 100000\n")
    assert cgroup_cpu_limit(tmp_path / "fs", proc) == pytest.approx(1.5)
    # The tightest limit wins, wherever it sits on the path.
    _write(tmp_path / "fs/jobs/cpu.max", "50000 100000\n")
    assert cgroup_cpu_limit(tmp_path / "fs", proc) == pytest.approx(0.5)


def test_cgroup_v2_without_quota(tmp_path: Path) -> None:
    proc = tmp_path / "proc_cgroup"
    _write(proc, "0::/\n")
    _write(tmp_path / "fs/cpu.max", "max 100000\n")
    assert cgroup_cpu_limit(tmp_path / "fs", proc) is None


def test_cgroup_v1_quota(tmp_path: Path) -> None:
    proc = tmp_path / "proc_cgroup"
    _write(proc, "4:memory:/x\n2:cpu,cpuacct:/job\n")
    _write(tmp_path / "fs/cpu,cpuacct/job/cpu.cfs_quota_us", "200000\n")
    _write(tmp_path / "fs/cpu,cpuacct/job/cpu.cfs_period_us", "100000\n")
    assert cgroup_cpu_limit(tmp_path / "fs", proc) == pytest.approx(2.0)
    # -1 is v1's "no quota".
    _write(tmp_path / "fs/cpu,cpuacct/job/cpu.cfs_quota_us", "-1\n")
    assert cgroup_cpu_limit(tmp_path / "fs", proc) is None


def test_usable_cpus_respects_affinity_and_quota(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu.cores.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5},
                        raising=False)
    monkeypatch.setattr(cpu.cores, "cgroup_cpu_limit", lambda: None)
    assert usable_cpus() == 6
    monkeypatch.setattr(cpu.cores, "cgroup_cpu_limit", lambda: 2.5)
    assert usable_cpus() == 3  # a fractional quota rounds up
    monkeypatch.setattr(cpu.cores, "cgroup_cpu_limit", lambda: 0.2)
    assert usable_cpus() == 1
    monkeypatch.setattr(cpu.cores, "cgroup_cpu_limit", lambda: 64.0)
    assert usable_cpus() == 6  # the affinity mask caps a generous quota


@pytest.mark.parametrize(
    ("cpus", "workers", "threads", "workers_out"),
    [
        (1, 0, 1, 0),
        (1, 4, 1, 0),
        (2, 0, 1, 0),  # one core stays free: no two OpenMP threads on two cores
        (2, 1, 1, 1),
        (2, 8, 1, 1),  # workers get at most half the cores
        (4, 8, 2, 2),
        (16, 8, 8, 8),
        (16, 0, 15, 0),
    ],
)
def test_plan_never_oversubscribes(cpus: int, workers: int, threads: int, workers_out: int) -> None:
    plan = plan_cpu(cpus, workers)
    assert (plan.threads, plan.workers) == (threads, workers_out)
    assert plan.threads + plan.workers <= max(cpus, 1 + plan.workers)
    assert plan.source == "auto"


def test_explicit_threads_win_and_workers_yield() -> None:
    assert plan_cpu(2, 1, threads=2) == CPUPlan(2, 2, 0, "--threads")
    assert plan_cpu(8, 8, threads=3) == CPUPlan(8, 3, 5, "--threads")
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match="--threads"):
            plan_cpu(2, 0, threads=bad)
    with pytest.raises(ValueError, match="workers"):
        plan_cpu(2, -1)


@pytest.mark.parametrize(
    ("cpus", "workers", "threads", "workers_out"),
    [(1, 1, 1, 0), (2, 1, 2, 0), (3, 2, 3, 0), (4, 4, 3, 1), (8, 2, 6, 2), (16, 8, 12, 4)],
)
def test_an_idle_machine_computes_on_every_core(
    cpus: int, workers: int, threads: int, workers_out: int
) -> None:
    plan = plan_cpu(cpus, workers, busy=0.2)
    assert (plan.threads, plan.workers) == (threads, workers_out)
    assert plan.threads + plan.workers == cpus or cpus == 1
    assert plan.idle_machine and "idle machine" in plan.describe()
    # Half a core of other work is enough to leave a core free again.
    busy = plan_cpu(cpus, workers, busy=0.5)
    assert not busy.idle_machine and busy.threads + busy.workers <= max(cpus, 1 + busy.workers)
    assert busy == dataclasses.replace(plan_cpu(cpus, workers, busy=None), busy=0.5)


def test_busy_cores_reads_the_machines_time_between_two_samples(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stat = tmp_path / "stat"
    #                user nice system idle iowait irq softirq
    stat.write_text("cpu  100 0 100 1000 0 0 0\ncpu0 1 0 0 0\ncpu1 1 0 0 0\nintr 5\n")

    def advance(_seconds: float) -> None:
        # 50 jiffies: 15 busy (user + system), 35 idle or waiting on I/O, over 2 CPUs.
        stat.write_text("cpu  110 0 105 1030 5 0 0\ncpu0 1 0 0 0\ncpu1 1 0 0 0\n")

    monkeypatch.setattr("time.sleep", advance)
    assert cpu.busy_cores(stat=stat) == pytest.approx(15 / 50 * 2)
    assert cpu.busy_cores(stat=tmp_path / "missing") is None
    stat.write_text("garbage\n")
    assert cpu.busy_cores(stat=stat) is None


def test_configure_cpu_sets_torch_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    before = torch.get_num_threads()
    monkeypatch.setattr(cpu.cores, "usable_cpus", lambda: 4)
    monkeypatch.setattr(cpu.cores, "busy_cores", lambda: 3.0)  # a busy machine
    try:
        plan = configure_cpu("cpu", workers=6)
        assert (plan.threads, plan.workers) == (2, 2)
        assert torch.get_num_threads() == 2
        plan = configure_cpu("cpu", workers=0, threads=1)
        assert torch.get_num_threads() == 1
        # On an accelerator the workers stay as asked and torch's threads are left alone.
        torch.set_num_threads(3)
        plan = configure_cpu("cuda", workers=6)
        assert plan.workers == 6 and torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_fit_logs_and_applies_the_plan(tmp_path: Path, monkeypatch, capsys) -> None:
    """`crasmra fit` on the CPU chooses threads and workers before the data module starts."""
    from crasmra.cli import main

    monkeypatch.setattr(cpu.cores, "usable_cpus", lambda: 2)
    monkeypatch.setattr(cpu.cores, "busy_cores", lambda: 2.0)  # a busy machine: a core left free
    before = torch.get_num_threads()
    out = tmp_path / "run"
    try:
        code = main(
            [
                "fit",
                f"--config={REPO / 'configs/demo.yaml'}",
                f"--trainer.default_root_dir={out}",
                "--trainer.max_epochs=1",
                "--trainer.limit_train_batches=1",
                "--trainer.limit_val_batches=1",
                "--trainer.limit_test_batches=1",
                "--trainer.enable_progress_bar=false",
                "--trainer.enable_model_summary=false",
                "--data.num_workers=4",
                "--data.image_size=32",
                "--data.resize_size=36",
                '--data.options={"num_classes": 3, "samples_per_class": 8, '
                '"test_samples_per_class": 2, "native_size": 36}',
            ]
        )
        assert code == 0
        assert torch.get_num_threads() == 1
        assert "1 intra-op thread(s) and 1 loader worker(s)" in capsys.readouterr().err
        config = (out / "config.yaml").read_text()
        assert "num_workers: 1" in config
    finally:
        torch.set_num_threads(before)


def _tiny_fit(root: Path, *extra: str) -> int:
    from crasmra.cli import main

    return main([
        "fit", f"--config={REPO / 'configs/demo.yaml'}", f"--trainer.default_root_dir={root}",
        "--trainer.max_epochs=1", "--trainer.limit_train_batches=1",
        "--trainer.limit_val_batches=1", "--trainer.limit_test_batches=1",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        "--data.image_size=32", "--data.resize_size=36", "--threads=1",
        '--data.options={"num_classes": 3, "samples_per_class": 8, '
        '"test_samples_per_class": 2, "native_size": 36}', *extra,
    ])


@pytest.mark.parametrize(
    ("flags", "extra", "precision", "how"),
    [
        ("avx2 avx512f avx512_bf16 amx_bf16", (), "bf16-mixed", "chosen"),
        ("avx2", (), "32-true", "chosen"),
        ("avx2 amx_bf16", ("--trainer.precision=32-true",), "32-true", "set on the command"),
    ],
)
def test_fit_chooses_the_precision_for_the_backbone_and_cpu(
    tmp_path: Path, monkeypatch, capsys, flags: str, extra: tuple[str, ...], precision: str,
    how: str,
) -> None:
    monkeypatch.setattr(cpu.compute, "cpu_flags", lambda cpuinfo=None: frozenset(flags.split()))
    before = torch.get_num_threads()
    try:
        assert _tiny_fit(tmp_path / "run", *extra) == 0
    finally:
        torch.set_num_threads(before)
    config = (tmp_path / "run" / "config.yaml").read_text()
    assert f"precision: {precision}" in config
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if "CPU compute:" in x)
    assert f"precision {precision}" in line and how in line and "resnet10t" in line


def test_plan_compute_per_family_and_cpu() -> None:
    amx = frozenset({"avx2", "avx512f", "avx512_bf16", "amx_bf16"})
    avx2 = frozenset({"avx2"})
    # ResNets gain from bf16 where the CPU has it natively, never where it is emulated.
    assert (cpu.plan_compute("resnet50", amx).precision, cpu.plan_compute("resnet50", amx)
            .channels_last) == ("bf16-mixed", True)
    plan = cpu.plan_compute("resnet50.tv_in1k", avx2)
    assert (plan.precision, plan.channels_last) == ("32-true", True)
    # The demo's small basic-block ResNet stays NCHW in fp32.
    assert not cpu.plan_compute("resnet10t", avx2).channels_last
    # Depthwise nets: channels-last fp32 everywhere, bf16 never.
    for flags in (amx, avx2):
        plan = cpu.plan_compute("tf_efficientnet_lite0", flags)
        assert (plan.precision, plan.channels_last) == ("32-true", True)
    # An unlisted family keeps what PyTorch does by default.
    plan = cpu.plan_compute("vgg11", amx)
    assert (plan.precision, plan.channels_last, plan.family) == ("32-true", False, None)
    assert cpu.cpu_bf16_support(amx) and not cpu.cpu_bf16_support(avx2)


def test_cpu_flags_reads_proc_cpuinfo(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 amx_bf16\n\nprocessor\t: 1\n")
    assert cpu.cpu_flags(info) == frozenset({"fpu", "avx2", "amx_bf16"})
    assert cpu.cpu_flags(tmp_path / "missing") == frozenset()


@pytest.mark.parametrize(("flags", "expected"), [("avx2 amx_bf16", True), ("avx2", False)])
def test_engine_resolves_channels_last_from_the_plan(
    tmp_path: Path, monkeypatch, flags: str, expected: bool
) -> None:
    import lightning as L

    from crasmra.data import FGVCDataModule
    from test_engine import TINY_DATA

    monkeypatch.setattr(cpu.compute, "cpu_flags", lambda cpuinfo=None: frozenset(flags.split()))
    dm = FGVCDataModule(**TINY_DATA)
    module = build_module(backbone="resnet10t", num_classes=dm.num_classes, head_channels=8,
                           head_hidden=8, channels_last=None)
    assert not module.uses_channels_last  # undecided until the device is known
    trainer = L.Trainer(default_root_dir=tmp_path, accelerator="cpu", max_steps=1,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, datamodule=dm)
    assert module.uses_channels_last is expected
    conv = module.net.backbone.model.conv1[0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) is expected
    # An explicit choice is kept whatever the CPU.
    assert not build_module(backbone="resnet10t", num_classes=3, channels_last=False,
                             head_channels=8, head_hidden=8).uses_channels_last


_STEP_FAULTS = """
import resource, sys, timm, torch
from crasmra import cpu
if not cpu.keep_freed_memory():
    print("unsupported"); raise SystemExit
torch.set_num_threads(1)
torch.manual_seed(0)
net = timm.create_model("tf_efficientnet_lite0", num_classes=4)
images = torch.randn(8, 3, 96, 96)
def step():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    net(images).sum().backward()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
# glibc still maps a few hundred pages in some later steps: the least of six is the reuse.
faults = [step() for _ in range(8)]
print(faults[0], min(faults[2:]))
"""


def test_keep_freed_memory_lets_a_step_reuse_the_previous_steps_pages() -> None:
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", _STEP_FAULTS], capture_output=True, text=True, check=True
    ).stdout.strip()
    if out == "unsupported":
        pytest.skip("the C library is not glibc")
    first, later = (int(v) for v in out.split())
    # A training step of a depthwise CNN maps thousands of 4 KiB pages the first time; with
    # freed memory kept, the later steps reuse them instead of faulting them in again.
    assert first > 2_000
    assert later < 500
