"""``crasmra sweep``: the sweep file, grid expansion, skipping finished runs, the report."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import REPO, TINY_CONFIG, run_cli
from crasmra import sweep as sw
from crasmra.config import load_config, set_key
from crasmra.errors import UsageError


def _spec(**overrides: Any) -> sw.SweepSpec:
    data: dict[str, Any] = {
        "base": {"model": {"net": {"backbone": "resnet10t"}}},
        "seeds": [0, 1, 2],
        "defaults": {"model.net.variant": "cra-smra", "model.net.delta": 0.9,
                     "model.loss.gamma": 1.0},
        "grids": {
            "variants": {"values": {"model.net.variant": ["baseline", "cbam", "cram", "cra-smra"]}},
            "delta": {"values": {"model.net.delta": [0.5, 0.7, 0.8, 0.9, 1.0]}},
            "gamma": {"values": {"model.loss.gamma": [0, 0.5, 1, 2]}},
        },
    }
    data.update(overrides)
    return sw.parse_sweep(data)


def _write_metrics(run_dir: Path, combined: float, *, test: bool = True) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    metrics: dict[str, Any] = {
        "best_val": {"epoch": 3, "metrics": {"val/combined_top1": combined + 0.01}},
    }
    if test:
        metrics["test"] = {
            "test/combined_top1": combined,
            "test/concat_top1": combined - 0.02,
            "test/stage3_top1": combined - 0.1,
            "test/stage4_top1": combined - 0.05,
            "test/stage5_top1": combined - 0.03,
        }
    (run_dir / "metrics.json").write_text(json.dumps(metrics))


# ---------------------------------------------------------------------------------------------
# Grid expansion
# ---------------------------------------------------------------------------------------------
def test_grids_are_separate_subgrids_and_shared_settings_run_once() -> None:
    spec = _spec()
    runs, rows = sw.plan_runs(spec)
    # 4 + 5 + 4 = 13 grid points; the default CRA-SMRA setting is in all three grids.
    assert sum(len(r) for r in rows.values()) == 13
    assert len({name for r in rows.values() for _, name in r}) == 11
    assert len(runs) == 11 * 3
    assert len({r.folder for r in runs}) == len(runs)
    shared = rows["variants"][3][1]
    assert rows["delta"][3][1] == shared and rows["gamma"][2][1] == shared  # 0.9 == 0.9, 1 == 1.0
    assert shared == "variant=cra-smra_delta=0.9_gamma=1"
    assert [r.seed for r in runs[:3]] == [0, 1, 2]


def test_multi_key_grid_is_a_product_and_rows_keep_file_order() -> None:
    spec = _spec(grids={"both": {"values": {"model.net.delta": [0.5, 0.9],
                                            "model.loss.gamma": [0, 1]}}}, seeds=[7])
    runs, rows = sw.plan_runs(spec)
    points = [p for p, _ in rows["both"]]
    assert points == [{"model.net.delta": d, "model.loss.gamma": g}
                      for d in (0.5, 0.9) for g in (0, 1)]
    assert [r.seed for r in runs] == [7] * 4
    assert spec.grids[0].label(points[1]) == "delta=0.5, gamma=1"


def test_run_config_sets_overrides_seed_and_run_folder_on_the_merged_base(tmp_path: Path) -> None:
    run = sw.plan_runs(_spec())[0][0]
    base = load_config(TINY_CONFIG)
    config = run.fit_config(str(TINY_CONFIG), tmp_path, resume=True)
    assert config["model"]["net"]["variant"] == "baseline"
    assert config["model"]["net"]["delta"] == 0.9 and config["model"]["loss"]["gamma"] == 1.0
    # Keys the setting does not name keep the base's values, in the same section.
    assert config["model"]["net"]["backbone"] == base["model"]["net"]["backbone"]
    assert config["data"] == base["data"]
    assert config["seed_everything"] == 0 and config["ckpt_path"] == "last"
    assert config["trainer"]["default_root_dir"] == str(tmp_path)
    assert "overwrite" not in config and "__base__" not in config
    fresh = run.fit_config({"model": {"net": {"backbone": "resnet10t"}}}, tmp_path)
    assert fresh["overwrite"] is True and "ckpt_path" not in fresh
    assert fresh["model"]["net"] == {"backbone": "resnet10t", "variant": "baseline", "delta": 0.9}


def test_fit_args_name_the_config_then_the_sweeps_flags(tmp_path: Path) -> None:
    assert sw.fit_args(tmp_path / "c.yaml", ["--threads=1"]) == [
        "fit", f"--config={tmp_path / 'c.yaml'}", "--threads=1"]
    inline = sw.fit_args({"model": {"net": {"backbone": "resnet10t"}}})
    assert yaml.safe_load(inline[1].removeprefix("--config=")) == {
        "model": {"net": {"backbone": "resnet10t"}}}


def test_set_key_creates_sections_and_refuses_a_value_on_the_way() -> None:
    config: dict = {"model": {"net": None}}
    set_key(config, "model.net.delta", 0.5)
    set_key(config, "data.options", {"num_classes": 4})
    assert config == {"model": {"net": {"delta": 0.5}}, "data": {"options": {"num_classes": 4}}}
    with pytest.raises(UsageError, match=r"model\.net\.delta is 0\.5"):
        set_key(config, "model.net.delta.x", 1)


def test_setting_names_stay_unique_when_last_components_collide() -> None:
    spec = _spec(defaults={}, seeds=[0], grids={
        "a": {"values": {"model.seed": [1]}}, "b": {"values": {"data.seed": [1]}}})
    runs, _ = sw.plan_runs(spec)
    assert len({r.setting_name for r in runs}) == 2
    assert all("model.seed=1" in r.setting_name or "data.seed=1" in r.setting_name for r in runs)


# ---------------------------------------------------------------------------------------------
# Validation of the sweep file
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"grid": {}}, "unknown key(s) ['grid']"),
        ({"seeds": []}, "`seeds` must be a non-empty list"),
        ({"seeds": [0, 0]}, "repeated"),
        ({"grids": {}}, "`grids` must map grid names"),
        ({"grids": {"d": {"values": {"model.net.delta": []}}}}, "non-empty list"),
        ({"grids": {"d": {"values": {"model.net.delta": [0.9, 0.90]}}}}, "lists a value twice"),
        ({"grids": {"d": {"values": {"delta": [0.5]}}}}, "'delta' is not a config key"),
        ({"grids": {"d": {"values": {"trainer.default_root_dir": ["x"]}}}}, "set by the sweep"),
        ({"grids": {"d": {"vals": {"model.net.delta": [0.5]}}}}, "unknown key(s) ['vals']"),
        ({"defaults": {"seed_everything": 1}}, "is not a config key"),
        ({"base": "no/such/config.yaml"}, "not found"),
        ({"launcher": "slurm"}, "`launcher` must be one of"),
    ],
)
def test_bad_sweep_files_are_rejected_with_the_fix(change: dict[str, Any], message: str) -> None:
    with pytest.raises(sw.SweepError, match=None) as err:
        _spec(**change)
    assert message in str(err.value)


def test_base_path_is_relative_to_the_sweep_file(tmp_path: Path) -> None:
    (tmp_path / "sweeps").mkdir()
    (tmp_path / "base.yaml").write_text("model: {backbone: resnet10t}\n")
    path = tmp_path / "sweeps" / "s.yaml"
    path.write_text(yaml.safe_dump({"base": "../base.yaml", "seeds": [0],
                                    "grids": {"d": {"values": {"model.net.delta": [0.5]}}}}))
    assert sw.load_sweep(path).base == str((tmp_path / "base.yaml").resolve())


def test_the_committed_sweep_files_are_valid() -> None:
    files = sorted((REPO / "sweeps").glob("*.yaml"))
    assert any(f.name == "synthetic.yaml" for f in files)
    for path in files:
        spec = sw.load_sweep(path)
        runs, _ = sw.plan_runs(spec)
        assert runs, path
    synthetic = sw.load_sweep(REPO / "sweeps" / "synthetic.yaml")
    assert len(sw.plan_runs(synthetic)[0]) == 33


@pytest.mark.slow
def test_a_misspelt_key_fails_before_any_run(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"base": str(TINY_CONFIG), "seeds": [0],
                                    "grids": {"d": {"values": {"model.detla": [0.5]}}}}))
    assert run_cli(["sweep", "--config", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "detla" in err[0] and err[0].startswith("crasmra: error:")
    assert not (tmp_path / "out" / "runs").exists()


# ---------------------------------------------------------------------------------------------
# Skipping, resuming and failures (the training itself replaced by a stub)
# ---------------------------------------------------------------------------------------------
def test_finished_runs_are_skipped_and_interrupted_ones_resumed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = _spec(grids={"delta": {"values": {"model.net.delta": [0.5, 0.9]}}}, seeds=[0, 1],
                 launcher="in-process")
    runs, _ = sw.plan_runs(spec)
    _write_metrics(tmp_path / runs[0].folder, 0.5)                 # finished
    _write_metrics(tmp_path / runs[1].folder, 0.5, test=False)     # stopped mid-way...
    (tmp_path / runs[1].folder / "checkpoints").mkdir()
    (tmp_path / runs[1].folder / "checkpoints" / "last.ckpt").write_bytes(b"")  # ...resumable
    _write_metrics(tmp_path / runs[2].folder, 0.5, test=False)     # failed before a checkpoint
    calls: list[dict[str, Any]] = []

    def fake_fit(args: list[str]) -> None:
        assert args[0] == "fit" and args[1].startswith("--config=")
        config = yaml.safe_load(Path(args[1].removeprefix("--config=")).read_text())
        calls.append(config)
        root = Path(config["trainer"]["default_root_dir"])
        assert root / sw.RUN_CONFIG == Path(args[1].removeprefix("--config="))
        assert not (root / "metrics.json").exists() or config.get("ckpt_path") == "last"
        if config["model"]["net"]["delta"] == 0.9 and config["seed_everything"] == 1:
            raise RuntimeError("boom")
        _write_metrics(root, 0.6)

    monkeypatch.setattr(sw.run, "_run_in_process", fake_fit)
    lines: list[str] = []
    summary = sw.run_sweep(spec, tmp_path, validate=False, echo=lines.append)
    assert summary["finished"] == 1 and summary["ran"] == 2
    assert summary["failed"] == [str(runs[3].folder)]
    assert len(calls) == 3
    assert calls[0]["ckpt_path"] == "last" and "ckpt_path" not in calls[1]
    assert calls[1]["overwrite"] is True
    record = json.loads((tmp_path / runs[3].folder / sw.RUN_FILE).read_text())
    assert record["status"] == "failed" and "boom" in record["error"]
    assert "boom" in (tmp_path / runs[3].folder / "error.txt").read_text()
    assert any("FAILED" in line for line in lines)

    calls.clear()
    again = sw.run_sweep(spec, tmp_path, validate=False, echo=lines.append)
    assert again["finished"] == 3 and len(calls) == 1  # only the failed run is retried


def test_runs_of_another_base_config_are_not_mixed_in(tmp_path: Path) -> None:
    spec = _spec(launcher="in-process")
    runs, _ = sw.plan_runs(spec)
    _write_metrics(tmp_path / runs[0].folder, 0.5)
    (tmp_path / runs[0].folder / sw.RUN_FILE).write_text(json.dumps(
        {"base_fingerprint": sw.base_fingerprint({"model": {"net": {"backbone": "resnet18"}}})}))
    with pytest.raises(sw.SweepError, match="different base config"):
        sw.run_sweep(spec, tmp_path, validate=False, dry_run=True, echo=lambda _: None)
    (tmp_path / runs[0].folder / sw.RUN_FILE).write_text(json.dumps(
        {"base_fingerprint": sw.base_fingerprint(spec.base)}))
    summary = sw.run_sweep(spec, tmp_path, validate=False, dry_run=True, echo=lambda _: None)
    assert summary["finished"] == 1


def test_dry_run_lists_and_runs_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = _spec(launcher="in-process")
    monkeypatch.setattr(sw.run, "_run_in_process", lambda *a: pytest.fail("ran"))
    lines: list[str] = []
    summary = sw.run_sweep(spec, tmp_path / "out", validate=False, dry_run=True, echo=lines.append)
    assert summary["runs"] == 33 and summary["ran"] == 0
    assert sum("would run" in line for line in lines) == 33
    assert not (tmp_path / "out").exists()


def test_seed_shards_are_disjoint_and_named_as_the_whole_sweep(tmp_path: Path) -> None:
    spec = _spec(launcher="in-process")
    whole, _ = sw.plan_runs(spec)
    shards = []
    for seeds in ([0, 1], [2]):
        lines: list[str] = []
        sw.run_sweep(spec, tmp_path, seeds=seeds, validate=False, dry_run=True,
                     echo=lines.append)
        assert f"(11 settings x {len(seeds)} seeds)" in lines[0]
        shards.append({line.split("would run ")[1] for line in lines if "would run" in line})
    assert not shards[0] & shards[1]
    assert shards[0] | shards[1] == {str(run.folder) for run in whole}
    with pytest.raises(sw.SweepError, match=r"seed\(s\) \[7\]"):
        sw.run_sweep(spec, tmp_path, seeds=[7], validate=False, dry_run=True, echo=print)


# ---------------------------------------------------------------------------------------------
# Aggregation and report
# ---------------------------------------------------------------------------------------------
def test_mean_and_sample_std() -> None:
    assert sw.mean_std([0.5, 0.6, 0.7]) == pytest.approx((0.6, 0.1))
    assert sw.mean_std([0.4]) == (0.4, 0.0)
    assert all(math.isnan(v) for v in sw.mean_std([]))
    stats = sw.aggregate({0: {"a": 1.0, "b": 2.0}, 1: {"a": 3.0}})
    assert stats["a"] == {"mean": 2.0, "std": pytest.approx(math.sqrt(2)), "n": 2,
                          "seeds": [0, 1], "values": [1.0, 3.0]}
    assert stats["b"]["n"] == 1 and stats["b"]["std"] == 0.0


def test_report_tables_and_plots_from_run_folders(tmp_path: Path) -> None:
    spec = _spec()
    runs, _ = sw.plan_runs(spec)
    accuracy = {0: 0.5, 1: 0.6, 2: 0.7}
    for run in runs:
        if run.setting_name.startswith("variant=cbam") and run.seed == 2:
            continue  # one missing seed: reported with its n
        bonus = 0.1 if "delta=0.5" in run.setting_name else 0.0
        _write_metrics(tmp_path / run.folder, accuracy[run.seed] + bonus)
    results = sw.write_report(spec, tmp_path, tmp_path / "report")
    text = (tmp_path / "report" / "results.md").read_text()
    assert results["runs_finished"] == 32 and results["runs_planned"] == 33
    assert "| variant | stage3 (test) | stage4 (test) | stage5 (test) | concat (test) | " \
           "combined (test) | combined (val) | seeds |" in text
    assert "| backbone only (`baseline`) | 50.0 ± 10.0 |" in text
    assert "55.0 ± 7.1 (n=2)" in text                   # cbam: seeds 0 and 1 only
    assert "**70.0 ± 10.0**" in text                    # best combined of the delta table
    assert "| 0.5 | 60.0 ± 10.0 | 65.0 ± 10.0 | 67.0 ± 10.0 | 68.0 ± 10.0 |" in text
    for name in ("variants", "delta", "gamma"):
        assert (tmp_path / "report" / "plots" / f"{name}.png").stat().st_size > 1000
        assert f"](plots/{name}.png)" in text
    saved = json.loads((tmp_path / "report" / "results.json").read_text())
    delta_rows = next(g for g in saved["grids"] if g["name"] == "delta")["rows"]
    values = delta_rows[0]["metrics"]["test/combined_top1"]["values"]
    assert values == pytest.approx([0.6, 0.7, 0.8])


# ---------------------------------------------------------------------------------------------
# End to end through the command line
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_mini_sweep_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sweep_file = tmp_path / "mini.yaml"
    sweep_file.write_text(yaml.safe_dump({
        "title": "mini",
        "base": str(TINY_CONFIG),
        "seeds": [0, 1],
        "grids": {
            "ok": {"values": {"model.net.delta": [0.5]}},
            # Fails when the model is built: the sweep must go on and report it.
            "broken": {"values": {"model.optim.lr_heads": [-1.0]}},
        },
        "launcher": "in-process",
        "threads": 1,
        "keep_checkpoints": False,
    }))
    out = tmp_path / "out"
    args = ["sweep", "--config", str(sweep_file), "--out", str(out)]
    assert run_cli(args) == 1
    printed = capsys.readouterr().out
    assert "2 runs failed" in printed and "2 of 4 runs finished" in printed
    for seed in (0, 1):
        run_dir = out / "runs" / "delta=0.5" / f"seed-{seed}"
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert "test/combined_top1" in metrics["test"]
        assert not (run_dir / "checkpoints").exists()
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert config["seed_everything"] == seed and config["model"]["net"]["delta"] == 0.5
        # The run's own config file, which `crasmra fit --config` repeats it from.
        own = yaml.safe_load((run_dir / sw.RUN_CONFIG).read_text())
        assert own["seed_everything"] == seed and own["model"]["net"]["delta"] == 0.5
        assert own["trainer"]["default_root_dir"] == str(run_dir.resolve())
        record = json.loads((run_dir / sw.RUN_FILE).read_text())
        assert record["args"][:2] == ["fit", f"--config={run_dir.resolve() / sw.RUN_CONFIG}"]
    failed = out / "runs" / "lr_heads=-1" / "seed-0"
    assert "lr_heads" in (failed / "error.txt").read_text()
    text = (out / "results.md").read_text()
    assert "| 0.5 |" in text and (out / "plots" / "ok.png").is_file()

    # Run again: the finished runs are skipped, only the broken ones are tried.
    assert run_cli([*args, "--grid", "ok"]) == 0
    assert "2 already finished, 0 to run" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# Paired comparisons against reference variants
# ---------------------------------------------------------------------------------------------
def _variant_spec(variants: list[str], seeds: list[int], **grid: Any) -> sw.SweepSpec:
    return sw.parse_sweep({
        "base": {"model": {"net": {"backbone": "resnet10t"}}},
        "seeds": seeds,
        "grids": {"variants": {"values": {"model.net.variant": variants}, **grid},
                  "delta": {"values": {"model.net.delta": [0.5, 0.9]}}},
    })


def test_compare_to_defaults_validation_and_round_trip() -> None:
    spec = _variant_spec(["plain", "baseline", "cram"], [0])
    assert spec.grids[0].compare_to == ["plain", "baseline"]
    assert spec.grids[1].compare_to == []  # the delta grid does not vary the variant
    assert _variant_spec(["cbam", "baseline"], [0]).grids[0].compare_to == ["baseline"]
    assert _variant_spec(["cbam", "cram"], [0]).grids[0].compare_to == []
    explicit = _variant_spec(["plain", "cbam", "cram"], [0], compare_to=["cram"])
    assert explicit.grids[0].compare_to == ["cram"]
    assert _variant_spec(["plain", "cram"], [0], compare_to=[]).grids[0].compare_to == []
    # The normalised sweep file keeps the choice, also an explicit "no comparison".
    for spec in (explicit, _variant_spec(["plain", "cram"], [0], compare_to=[])):
        again = sw.parse_sweep(yaml.safe_load(yaml.safe_dump(spec.to_dict(), sort_keys=False)))
        assert again.grids[0].compare_to == spec.grids[0].compare_to
        assert "compare_to" not in spec.to_dict()["grids"]["delta"]


@pytest.mark.parametrize(
    ("grid", "message"),
    [
        ({"values": {"model.net.delta": [0.5]}, "compare_to": ["plain"]},
         "needs a grid that varies model.net.variant"),
        ({"values": {"model.net.variant": ["plain", "cram"]}, "compare_to": ["baseline"]},
         "names ['baseline'], which the grid does not run"),
        ({"values": {"model.net.variant": ["plain", "cram"]}, "compare_to": ["plain", "plain"]},
         "lists a variant twice"),
        ({"values": {"model.net.variant": ["plain", "cram"]}, "compare_to": {"plain": 1}},
         "`compare_to` must be a list of variants"),
    ],
)
def test_bad_compare_to_is_rejected_with_the_fix(grid: dict[str, Any], message: str) -> None:
    with pytest.raises(sw.SweepError) as err:
        _spec(grids={"g": grid})
    assert message in str(err.value)


def test_paired_difference_matches_a_paired_t_test() -> None:
    from scipy import stats

    variant = {0: 0.50, 1: 0.60, 2: 0.70, 3: 0.65}
    reference = {0: 0.45, 1: 0.58, 2: 0.66, 7: 0.10}  # seeds 3 and 7 have no pair
    result = sw.paired_difference(variant, reference)
    assert result["seeds"] == [0, 1, 2] and result["n"] == 3
    assert result["differences"] == pytest.approx([0.05, 0.02, 0.04])
    # An independent computation: scipy's paired t-test and its confidence interval.
    test = stats.ttest_rel([0.50, 0.60, 0.70], [0.45, 0.58, 0.66])
    low, high = test.confidence_interval(0.95)
    assert result["mean"] == pytest.approx(0.11 / 3)
    assert (result["ci_low"], result["ci_high"]) == (pytest.approx(low), pytest.approx(high))
    # By hand: differences 1, 2, 3 points, sd 1 point, t(0.975, 2) = 4.302653.
    hand = sw.paired_difference({0: 0.51, 1: 0.52, 2: 0.53}, {0: 0.50, 1: 0.50, 2: 0.50})
    assert hand["mean"] == pytest.approx(0.02) and hand["std"] == pytest.approx(0.01)
    half = 4.302652729911275 * 0.01 / math.sqrt(3)
    assert hand["ci_low"] == pytest.approx(0.02 - half)
    assert hand["ci_high"] == pytest.approx(0.02 + half)

    one = sw.paired_difference({0: 0.7, 1: 0.8}, {1: 0.75})
    assert one["n"] == 1 and one["mean"] == pytest.approx(0.05)
    assert one["std"] is None and one["ci_low"] is None and one["ci_high"] is None
    none = sw.paired_difference({0: 0.7}, {1: 0.75})
    assert none["n"] == 0 and none["mean"] is None


def _write_variant_metrics(run_dir: Path, variant: str, combined: float) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    heads = ["classifier"] if variant == "plain" else ["stage3", "stage4", "stage5", "concat"]
    test = {f"test/{h}_top1": combined - 0.01 for h in heads}
    test["test/combined_top1"] = combined
    metrics = {"best_val": {"epoch": 1, "metrics": {"val/combined_top1": combined}},
               "test": test}
    (run_dir / "metrics.json").write_text(json.dumps(metrics))


def test_report_has_paired_tables_against_the_references(tmp_path: Path) -> None:
    spec = _variant_spec(["plain", "baseline", "cram"], [0, 1, 2])
    combined = {
        "plain": {0: 0.60, 1: 0.62, 2: 0.58},
        "baseline": {0: 0.61, 1: 0.65, 2: 0.60},
        "cram": {0: 0.64, 1: 0.66},  # seed 2 did not finish: two pairs only
    }
    runs, _ = sw.plan_runs(spec)
    for run in runs:
        variant = dict(run.overrides).get("model.net.variant", "cra-smra")
        if variant in combined and run.seed in combined[variant]:
            _write_variant_metrics(tmp_path / run.folder, variant, combined[variant][run.seed])
    results = sw.write_report(spec, tmp_path, tmp_path / "report", groups=["variants"])
    (grid,) = results["grids"]
    assert grid["compare_to"] == ["plain", "baseline"]
    vs_plain, vs_baseline = grid["comparisons"]
    assert vs_plain["reference"] == "plain" and vs_plain["metric"] == "test/combined_top1"
    assert [r["setting"] for r in vs_plain["rows"]] == ["variant=baseline", "variant=cram"]
    assert [r["setting"] for r in vs_baseline["rows"]] == ["variant=plain", "variant=cram"]

    baseline = vs_plain["rows"][0]["metrics"]["test/combined_top1"]
    assert baseline["differences"] == pytest.approx([0.01, 0.03, 0.02])
    half = 4.302652729911275 * 0.01 / math.sqrt(3)  # differences 1, 3, 2 points: sd 1 point
    assert (baseline["mean"], baseline["ci_low"], baseline["ci_high"]) == (
        pytest.approx(0.02), pytest.approx(0.02 - half), pytest.approx(0.02 + half))
    cram = vs_baseline["rows"][1]["metrics"]["test/combined_top1"]
    assert cram["seeds"] == [0, 1] and cram["differences"] == pytest.approx([0.03, 0.01])
    half = 12.706204736174707 * math.sqrt(2) * 0.01 / math.sqrt(2)  # t(0.975, 1), sd sqrt(2)
    assert (cram["ci_low"], cram["ci_high"]) == (pytest.approx(0.02 - half),
                                                 pytest.approx(0.02 + half))
    # Only the metrics both settings report are compared: plain has no stage heads.
    assert "test/stage3_top1" not in vs_plain["rows"][0]["metrics"]
    assert "test/stage3_top1" in vs_baseline["rows"][1]["metrics"]
    assert "val/combined_top1" in vs_plain["rows"][0]["metrics"]

    text = (tmp_path / "report" / "results.md").read_text()
    assert ("| variant | stage3 (test) | stage4 (test) | stage5 (test) | classifier (test) | "
            "concat (test) | combined (test) | combined (val) | seeds |") in text
    assert "vs backbone with its own classifier (`plain`)" in text
    assert "vs backbone only (`baseline`)" in text
    assert ("| backbone only (`baseline`) | +2.0 | [-0.5, +4.5] | 3 | "
            "0: +1.0, 1: +3.0, 2: +2.0 |") in text
    assert "| backbone + CRAM (`cram`) | +2.0 | [-10.7, +14.7] | 2 | 0: +3.0, 1: +1.0 |" in text
    assert "Student t, n - 1 degrees of freedom" in text
    saved = json.loads((tmp_path / "report" / "results.json").read_text())
    assert saved["grids"][0]["comparisons"][0]["rows"][0]["metrics"]["test/combined_top1"][
        "differences"] == pytest.approx([0.01, 0.03, 0.02])


def test_one_seed_gives_no_interval_and_multi_key_grids_pair_within_a_value(
        tmp_path: Path) -> None:
    spec = sw.parse_sweep({
        "base": {"model": {"net": {"backbone": "resnet10t"}}},
        "seeds": [0],
        "grids": {"vd": {"values": {"model.net.variant": ["plain", "cram"],
                                    "model.net.delta": [0.5, 0.9]}}},
    })
    runs, _ = sw.plan_runs(spec)
    for run in runs:
        overrides = dict(run.overrides)
        value = 0.5 + (0.1 if overrides["model.net.variant"] == "cram" else 0.0) \
            + (0.2 if overrides["model.net.delta"] == 0.9 else 0.0)
        _write_variant_metrics(tmp_path / run.folder, overrides["model.net.variant"], value)
    results = sw.build_results(spec, tmp_path)
    (comparison,) = results["grids"][0]["comparisons"]
    assert comparison["label"] == "`plain`"
    rows = comparison["rows"]
    assert [r["reference_setting"] for r in rows] == ["variant=plain_delta=0.5",
                                                      "variant=plain_delta=0.9"]
    for row in rows:
        stats = row["metrics"]["test/combined_top1"]
        assert stats["mean"] == pytest.approx(0.1) and stats["ci_low"] is None
    text = sw.format_markdown(results)
    assert "| variant=cram, delta=0.5 | +10.0 | n/a | 1 | 0: +10.0 |" in text


def test_subprocess_runs_do_not_import_code_from_the_working_folder(tmp_path: Path) -> None:
    from crasmra.sweep import CHILD_COMMAND

    # A module in the working folder that shadows one the command line imports.
    (tmp_path / "argparse.py").write_text(
        "import pathlib\npathlib.Path('imported-from-cwd').write_text('ran')\n"
        "raise SystemExit(7)\n"
    )
    plain = subprocess.run([sys.executable, "-m", "crasmra.cli", "--version"], cwd=tmp_path,
                           capture_output=True, text=True, timeout=120)
    assert plain.returncode == 7  # the hazard: `python -m` runs the folder's argparse.py
    (tmp_path / "imported-from-cwd").unlink()
    child = subprocess.run([*CHILD_COMMAND, "--version"], cwd=tmp_path, capture_output=True,
                           text=True, timeout=120)
    assert child.returncode == 0, child.stderr
    assert child.stdout.startswith("crasmra ")
    assert not (tmp_path / "imported-from-cwd").exists()
