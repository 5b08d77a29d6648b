"""CPU budget: cgroup quotas, affinity, and the split between threads and loader workers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import REPO
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
    monkeypatch.setattr(cpu.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5}, raising=False)
    monkeypatch.setattr(cpu, "cgroup_cpu_limit", lambda: None)
    assert usable_cpus() == 6
    monkeypatch.setattr(cpu, "cgroup_cpu_limit", lambda: 2.5)
    assert usable_cpus() == 3  # a fractional quota rounds up
    monkeypatch.setattr(cpu, "cgroup_cpu_limit", lambda: 0.2)
    assert usable_cpus() == 1
    monkeypatch.setattr(cpu, "cgroup_cpu_limit", lambda: 64.0)
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


def test_configure_cpu_sets_torch_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    before = torch.get_num_threads()
    monkeypatch.setattr(cpu, "usable_cpus", lambda: 4)
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

    monkeypatch.setattr(cpu, "usable_cpus", lambda: 2)
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
