"""The runs a sweep plans: one per distinct setting and seed, with readable folder names."""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from crasmra.config import load_config, set_key
from crasmra.flag_moves import legacy_key
from crasmra.sweep.spec import (
    SweepError,
    SweepSpec,
    canonical,
    format_value,
    short_key,
)

__all__ = [
    "RunSpec",
    "fit_args",
    "is_finished",
    "plan_runs",
    "read_metrics",
    "select_grids",
    "setting_key",
    "setting_name",
]


@dataclass(frozen=True)
class RunSpec:
    """One training run of a sweep: a setting (complete overrides) and a seed.

    Attributes:
        overrides: Config key -> value, the sweep's defaults updated by the grid point.
        seed: The run's ``--seed_everything``.
        setting_name: Folder name of the setting (shared by its seeds).
    """

    overrides: tuple[tuple[str, Any], ...]
    seed: int
    setting_name: str

    @property
    def folder(self) -> Path:
        """The run folder, relative to the sweep's output folder."""
        return Path("runs") / self.setting_name / f"seed-{self.seed}"

    def fit_config(self, base: str | dict[str, Any], root: Path,
                   resume: bool = False) -> dict[str, Any]:
        """The complete ``crasmra fit`` config of this run, writing into ``root``.

        The base config with its ``__base__`` chain merged (:func:`crasmra.config.load_config`),
        the setting's values set on it, the seed and the run folder.
        """
        config = load_config(base) if isinstance(base, str) else copy.deepcopy(base)
        for key, value in self.overrides:
            set_key(config, key, copy.deepcopy(value))
        config["seed_everything"] = self.seed
        set_key(config, "trainer.default_root_dir", str(root))
        # A run that is not resumed starts over in its own folder, replacing what an
        # interrupted attempt left there.
        if resume:
            config["ckpt_path"] = "last"
        else:
            config["overwrite"] = True
        return config


def fit_args(config: str | Path | dict[str, Any], extra: Sequence[str] = ()) -> list[str]:
    """``crasmra fit`` arguments for a run config (a file, or a dict given inline as YAML),
    followed by the sweep's ``--set`` flags and thread count (``extra``)."""
    text = yaml.safe_dump(config, sort_keys=False) if isinstance(config, dict) else str(config)
    return ["fit", f"--config={text}", *extra]


def setting_key(overrides: dict[str, Any]) -> str:
    """Identity of a setting: its overrides with numbers compared by value.

    The training module's options count under their flat names from before they moved into
    parts (:func:`crasmra.flag_moves.legacy_key`), so that runs finished before the move keep
    their identity (and their folder's hash, where the name has one).
    """
    return json.dumps({legacy_key(k): canonical(v) for k, v in sorted(overrides.items())},
                      sort_keys=True)


def setting_name(overrides: dict[str, Any], varied: Sequence[str]) -> str:
    """A readable, file-system safe folder name from the values of the varied keys.

    Keys that no grid varies are left out; a short hash of the complete overrides keeps the
    name unique when two keys share a last component or a name would be too long.
    """
    import hashlib

    shorts = [short_key(k) for k in varied]
    ambiguous = len(set(shorts)) != len(shorts)
    parts = []
    for key in varied:
        if key in overrides:
            label = key if ambiguous else short_key(key)
            parts.append(f"{label}={format_value(overrides[key])}")
    name = re.sub(r"[^\w.=+-]+", "-", "_".join(parts)).strip("-") or "base"
    if ambiguous or len(name) > 100 or name != "_".join(parts):
        digest = hashlib.sha1(setting_key(overrides).encode()).hexdigest()[:8]
        name = f"{name[:90]}_{digest}"
    return name


def plan_runs(spec: SweepSpec) -> tuple[list[RunSpec], dict[str, list[tuple[dict[str, Any], str]]]]:
    """The distinct runs of a sweep and, per grid, its points with their setting names.

    Returns:
        ``(runs, rows)``: ``runs`` in execution order (grid by grid, point by point, seed by
        seed), each distinct (setting, seed) once; ``rows[grid.name]`` the grid's points as
        ``(point, setting_name)`` in table order.
    """
    varied: list[str] = []
    for grid in spec.grids:
        varied += [k for k in grid.values if k not in varied]
    names: dict[str, str] = {}
    runs: list[RunSpec] = []
    rows: dict[str, list[tuple[dict[str, Any], str]]] = {}
    for grid in spec.grids:
        rows[grid.name] = []
        for point in grid.points():
            overrides = {**spec.defaults, **point}
            key = setting_key(overrides)
            if key not in names:
                name = setting_name(overrides, varied)
                if name in names.values():
                    raise SweepError(f"two different settings map to the folder name {name}.")
                names[key] = name
                ordered = tuple((k, overrides[k]) for k in sorted(overrides))
                runs += [RunSpec(ordered, seed, name) for seed in spec.seeds]
            rows[grid.name].append((point, names[key]))
    return runs, rows


def read_metrics(run_dir: Path) -> dict[str, Any] | None:
    """A run's ``metrics.json``, or ``None`` if it is missing or unreadable."""
    path = run_dir / "metrics.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def is_finished(run_dir: Path) -> bool:
    """Whether a run folder holds a finished run (its ``metrics.json`` has test results)."""
    metrics = read_metrics(run_dir)
    return bool(metrics and metrics.get("test"))


def select_grids(spec: SweepSpec, groups: Iterable[str] | None) -> SweepSpec:
    """``spec`` with only the grids named in ``groups`` (all of them for None).

    Raises:
        SweepError: A name is not a grid of the sweep.
    """
    if groups is None:
        return spec
    wanted = list(groups)
    names = [g.name for g in spec.grids]
    unknown = [g for g in wanted if g not in names]
    if unknown:
        raise SweepError(f"no grid named {', '.join(unknown)}; the sweep has {', '.join(names)}.")
    from dataclasses import replace

    return replace(spec, grids=[g for g in spec.grids if g.name in wanted])
