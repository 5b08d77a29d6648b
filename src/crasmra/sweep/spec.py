"""Sweep files: their schema and their checks."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from crasmra.errors import CrasmraError
from crasmra.flag_moves import moved_message
from crasmra.metric_names import TEST_COMBINED_TOP1

__all__ = [
    "COMPARE_METRIC",
    "DEFAULT_REFERENCES",
    "GRID_KEYS",
    "LAUNCHERS",
    "RUN_FILE",
    "SWEEP_KEYS",
    "VARIANT_KEY",
    "VARIANT_LABELS",
    "Grid",
    "SweepError",
    "SweepSpec",
    "canonical",
    "check_key",
    "format_value",
    "load_sweep",
    "parse_sweep",
    "short_key",
]

#: Top-level keys of a sweep file.
SWEEP_KEYS = frozenset({
    "title", "description", "base", "seeds", "defaults", "grids", "launcher", "threads",
    "keep_checkpoints", "resume",
})
#: Keys of one grid.
GRID_KEYS = frozenset({"title", "values", "labels", "compare_to"})
#: The config key whose grids get paired comparisons against reference variants.
VARIANT_KEY = "model.net.variant"
#: Reference variants of a variant grid that names no ``compare_to``, when it has them.
DEFAULT_REFERENCES = ("plain", "baseline")
#: The metric the paired-difference tables show (results.json has every shared metric).
COMPARE_METRIC = TEST_COMBINED_TOP1
LAUNCHERS = ("in-process", "subprocess")
#: Override keys must be config keys of `crasmra fit` under one of these sections.
_KEY_RE = re.compile(r"^(model|data|trainer|checkpoint)(\.[A-Za-z_]\w*)+$")
#: Keys the sweep sets itself (run folder, seed, resuming, the final test).
_RESERVED_KEYS = frozenset({
    "trainer.default_root_dir", "seed_everything", "ckpt_path", "test_after_fit",
})
#: Row labels of the variant grid in the wording of the paper's Table 3.
VARIANT_LABELS = {
    "plain": "backbone with its own classifier",
    "baseline": "backbone only",
    "cbam": "backbone + CBAM",
    "cram": "backbone + CRAM",
    "cra-smra": "backbone + CRAM + SMRAM",
}
RUN_FILE = "sweep_run.json"


class SweepError(CrasmraError, ValueError):
    """A problem with a sweep file or its output folder, with a message that says what to change."""


# ---------------------------------------------------------------------------------------------
# The sweep file
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Grid:
    """One sub-grid: the product of its keys' values (each point is run once per seed).

    Attributes:
        name: Key of the grid in the sweep file; also the plot's file name.
        title: Heading of its table.
        values: Config key -> the values it takes, in the order the table lists them.
        labels: Optional row labels, keyed by the value's text (e.g. ``cbam: "+ CBAM"``).
        compare_to: Reference variants (values of ``model.net.variant`` in this grid) that every
            other variant is compared with, seed by seed; empty for grids that do not vary
            the variant. Default: those of :data:`DEFAULT_REFERENCES` the grid has.
    """

    name: str
    title: str
    values: dict[str, list[Any]]
    labels: dict[str, str] = field(default_factory=dict)
    compare_to: list[str] = field(default_factory=list)

    def points(self) -> list[dict[str, Any]]:
        """Every combination of the grid's values, the first key varying slowest."""
        points: list[dict[str, Any]] = [{}]
        for key, values in self.values.items():
            points = [{**p, key: v} for p in points for v in values]
        return points

    def label(self, point: dict[str, Any]) -> str:
        """Row label of one grid point."""
        if len(self.values) == 1:
            (key, value), = point.items()
            text = format_value(value)
            if text in self.labels:
                return self.labels[text]
            if key == VARIANT_KEY and text in VARIANT_LABELS:
                return f"{VARIANT_LABELS[text]} (`{text}`)"
            return text
        return ", ".join(f"{short_key(k)}={format_value(v)}" for k, v in point.items())


@dataclass(frozen=True)
class SweepSpec:
    """A validated sweep file.

    Attributes:
        base: The base fit config: a path to a YAML file, or an inline config mapping.
        seeds: Seeds; every grid point is run once per seed (``--seed_everything``).
        defaults: Overrides every run gets unless its grid sets the key.
        grids: The sub-grids, in file order.
        title: Heading of the report.
        description: Text placed under the heading of the report.
        launcher: ``"in-process"`` (fast; one device) or ``"subprocess"`` (each run in a fresh
            ``python -m crasmra.cli fit``; needed for multi-device DDP runs).
        threads: Intra-op CPU threads of every run (``crasmra fit --threads``); ``None``
            lets each run choose them from the usable cores (see :mod:`crasmra.cpu`).
        keep_checkpoints: Keep each finished run's checkpoints (``False`` deletes them once its
            test result is written, which is all the report needs).
        resume: Resume unfinished runs from their ``last.ckpt`` instead of restarting them.
        source: The sweep file, if it was read from one.
    """

    base: str | dict[str, Any]
    seeds: list[int]
    defaults: dict[str, Any]
    grids: list[Grid]
    title: str = "Sweep"
    description: str = ""
    launcher: str = "subprocess"
    threads: int | None = None
    keep_checkpoints: bool = True
    resume: bool = True
    source: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        """The spec as a sweep-file mapping (what ``OUT/sweep.yaml`` holds)."""
        return {
            "title": self.title,
            "description": self.description,
            "base": self.base,
            "seeds": list(self.seeds),
            "defaults": dict(self.defaults),
            "grids": {g.name: {"title": g.title, "values": g.values,
                               **({"labels": g.labels} if g.labels else {}),
                               # Written even when empty: an absent key means the default.
                               **({"compare_to": list(g.compare_to)}
                                  if VARIANT_KEY in g.values else {})}
                      for g in self.grids},
            "launcher": self.launcher,
            "threads": self.threads,
            "keep_checkpoints": self.keep_checkpoints,
            "resume": self.resume,
        }


def short_key(key: str) -> str:
    """``model.net.delta`` -> ``delta``: the last component of a config key."""
    return key.rsplit(".", 1)[-1]


def format_value(value: Any) -> str:
    """A value as text for folder names and tables: ``1.0`` -> ``1``, ``True`` -> ``true``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, int | float | str):
        return str(value)
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def canonical(value: Any) -> Any:
    """Numbers compare by value (``1`` and ``1.0`` are the same setting); bools stay bools."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, list | tuple):
        return [canonical(v) for v in value]
    if isinstance(value, dict):
        return {str(k): canonical(v) for k, v in sorted(value.items())}
    return value


def check_key(key: Any, where: str) -> str:
    if not isinstance(key, str) or not _KEY_RE.match(key):
        raise SweepError(
            f"{where}: {key!r} is not a config key; use the dotted key of a `crasmra fit` flag "
            "under model., data., trainer. or checkpoint. (e.g. model.net.delta, data.options)."
        )
    moved = moved_message(key, "")
    if moved:
        raise SweepError(f"{where}: {moved}.")
    if key in _RESERVED_KEYS:
        raise SweepError(f"{where}: {key} is set by the sweep itself and cannot be given.")
    return key


def _check_scalar_or_config(value: Any, where: str) -> None:
    if not isinstance(value, bool | int | float | str | list | dict) and value is not None:
        raise SweepError(f"{where}: {value!r} is not a YAML scalar, list or mapping.")
    if isinstance(value, float) and not math.isfinite(value):
        raise SweepError(f"{where}: {value!r} is not a finite number.")


def _check_keys(data: dict, allowed: set[str] | frozenset[str], where: str, what: str) -> None:
    unknown = sorted(set(map(str, data)) - allowed)
    if unknown:
        raise SweepError(f"{where}: unknown key(s) {unknown}; {what} takes "
                         f"{', '.join(sorted(allowed))}.")


def parse_sweep(data: Any, source: Path | None = None) -> SweepSpec:
    """Validate a sweep mapping (a parsed sweep file) and return its :class:`SweepSpec`.

    Raises:
        SweepError: The mapping is not a valid sweep; the message names the key and the fix.
    """
    where = str(source) if source else "sweep"
    if not isinstance(data, dict):
        raise SweepError(f"{where}: a sweep file is a YAML mapping with base, seeds and grids.")
    _check_keys(data, SWEEP_KEYS, where, "a sweep file")
    for required in ("base", "seeds", "grids"):
        if required not in data:
            raise SweepError(f"{where}: `{required}` is missing.")

    base = data["base"]
    if isinstance(base, str):
        path = Path(base).expanduser()
        if not path.is_absolute() and source is not None:
            # Relative to the sweep file, like the `config:` includes of fit configs.
            path = source.resolve().parent / path
        if not path.is_file():
            raise SweepError(f"{where}: base config {base} not found (looked for {path}).")
        base = str(path.resolve())
    elif isinstance(base, dict):
        if not base:
            raise SweepError(f"{where}: `base` is an empty mapping.")
    else:
        raise SweepError(f"{where}: `base` must be a fit config path or an inline config mapping.")

    seeds = data["seeds"]
    if (not isinstance(seeds, list) or not seeds
            or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)):
        raise SweepError(f"{where}: `seeds` must be a non-empty list of integers, got {seeds!r}.")
    if len(set(seeds)) != len(seeds):
        raise SweepError(f"{where}: `seeds` has repeated values: {seeds}.")

    defaults = data.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise SweepError(f"{where}: `defaults` must map config keys to values.")
    for key, value in defaults.items():
        check_key(key, f"{where}: defaults")
        _check_scalar_or_config(value, f"{where}: defaults.{key}")

    grids_data = data["grids"]
    if not isinstance(grids_data, dict) or not grids_data:
        raise SweepError(f"{where}: `grids` must map grid names to grids, e.g. "
                         "`grids: {delta: {values: {model.net.delta: [0.5, 0.9]}}}`.")
    grids = [_parse_grid(name, g, where) for name, g in grids_data.items()]

    launcher = data.get("launcher", "subprocess")
    if launcher not in LAUNCHERS:
        raise SweepError(
            f"{where}: `launcher` must be one of {', '.join(LAUNCHERS)}, got {launcher!r}."
        )
    threads = data.get("threads")
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool)
                                or threads < 1):
        raise SweepError(f"{where}: `threads` must be an integer >= 1 or null, got {threads!r}.")
    flags = {}
    for name in ("keep_checkpoints", "resume"):
        flags[name] = data.get(name, True)
        if not isinstance(flags[name], bool):
            raise SweepError(f"{where}: `{name}` must be true or false, got {flags[name]!r}.")
    title = data.get("title", "Sweep")
    description = data.get("description", "")
    if not isinstance(title, str) or not isinstance(description, str):
        raise SweepError(f"{where}: `title` and `description` must be text.")
    return SweepSpec(base=base, seeds=list(seeds), defaults=dict(defaults), grids=grids,
                     title=title, description=description.strip(), launcher=launcher,
                     threads=threads, source=source, **flags)


def _parse_grid(name: Any, data: Any, where: str) -> Grid:
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][\w-]*", name):
        raise SweepError(f"{where}: grid name {name!r} must be a word (letters, digits, - and _).")
    where = f"{where}: grids.{name}"
    if not isinstance(data, dict):
        raise SweepError(f"{where} must be a mapping with `values` (and optional title, labels, "
                         "compare_to).")
    _check_keys(data, GRID_KEYS, where, "a grid")
    values = data.get("values")
    if not isinstance(values, dict) or not values:
        raise SweepError(f"{where}: `values` must map config keys to lists of values, "
                         "e.g. `values: {model.net.delta: [0.5, 0.9]}`.")
    for key, options in values.items():
        check_key(key, where)
        if not isinstance(options, list) or not options:
            raise SweepError(f"{where}: {key} must be a non-empty list of values, got {options!r}.")
        for value in options:
            _check_scalar_or_config(value, f"{where}: {key}")
        canon = [json.dumps(canonical(v), sort_keys=True) for v in options]
        if len(set(canon)) != len(canon):
            raise SweepError(f"{where}: {key} lists a value twice: {options}.")
    labels = data.get("labels") or {}
    if not isinstance(labels, dict) or not all(isinstance(v, str) for v in labels.values()):
        raise SweepError(f"{where}: `labels` must map values to row labels (text).")
    title = data.get("title", name)
    if not isinstance(title, str):
        raise SweepError(f"{where}: `title` must be text.")
    return Grid(name=name, title=title, values={k: list(v) for k, v in values.items()},
                labels={format_value(k): v for k, v in labels.items()},
                compare_to=_parse_compare_to(data, values, where))


def _parse_compare_to(data: dict, values: dict[str, list[Any]], where: str) -> list[str]:
    """The grid's reference variants: checked when given, else the defaults it has."""
    variants = values.get(VARIANT_KEY)
    if "compare_to" not in data:
        return [v for v in DEFAULT_REFERENCES if variants and v in variants]
    refs = data["compare_to"]
    if variants is None:
        raise SweepError(f"{where}: `compare_to` needs a grid that varies {VARIANT_KEY}; add "
                         f"{VARIANT_KEY} to its values or remove `compare_to`.")
    if refs is None:
        refs = []
    if isinstance(refs, str):
        refs = [refs]
    if not isinstance(refs, list) or not all(isinstance(r, str) for r in refs):
        raise SweepError(f"{where}: `compare_to` must be a list of variants, e.g. "
                         f"[plain, baseline], got {data['compare_to']!r}.")
    if len(set(refs)) != len(refs):
        raise SweepError(f"{where}: `compare_to` lists a variant twice: {refs}.")
    missing = [r for r in refs if r not in variants]
    if missing:
        raise SweepError(f"{where}: `compare_to` names {missing}, which the grid does not run; "
                         f"choose from its {VARIANT_KEY} values {variants}.")
    return list(refs)


def load_sweep(path: str | Path) -> SweepSpec:
    """Read and validate a sweep file."""
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"sweep file {path} not found.")
    from crasmra.config import load_yaml
    from crasmra.errors import UsageError

    try:
        data = load_yaml(path.read_text(), str(path))
    except yaml.YAMLError as err:
        raise SweepError(f"{path} is not valid YAML: {err}") from err
    except UsageError as err:  # a YAML bomb or absurd nesting
        raise SweepError(str(err)) from None
    return parse_sweep(data, source=path)
