"""Sweeps: run a grid of ``crasmra fit`` runs from one YAML file and report mean ± std over seeds.

A sweep file names a base fit config, the seeds, values every run gets, and one or more
*grids*. Each grid is a separate sub-grid (its own product of values, times the seeds), so
"variants x seeds", "delta x seeds" and "gamma x seeds" stay three small grids rather than one
product. Runs are identified by their complete overrides: a setting that several grids share
(e.g. the default CRA-SMRA run in the variant, delta and gamma grids) is trained once.

A grid that varies ``model.variant`` is also reported as paired differences against reference
variants (its ``compare_to``, default ``plain`` and ``baseline`` where the grid has them):
per seed, each variant minus the reference, with the mean and a 95% Student-t interval.

Layout of the output folder ``OUT``::

    OUT/sweep.yaml                      the sweep file as run (normalised)
    OUT/runs/<setting>/seed-<k>/        one crasmra run folder per (setting, seed)
    OUT/runs/<setting>/seed-<k>/sweep_run.json   the run's overrides, status and wall time
    REPORT/results.md, results.json     tables (REPORT defaults to OUT)
    REPORT/plots/<grid>.png             accuracy against the grid's value, with error bars

A run counts as finished when its ``metrics.json`` has a ``test`` entry; finished runs are
skipped, and a run with a ``checkpoints/last.ckpt`` but no test result is resumed from it, so
a stopped sweep continues where it stopped.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
import shutil
import signal
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from crasmra.callbacks import write_json_atomic
from crasmra.errors import CrasmraError

__all__ = [
    "Grid",
    "RunSpec",
    "SweepError",
    "SweepSpec",
    "aggregate",
    "collect",
    "format_comparison",
    "format_markdown",
    "load_sweep",
    "paired_comparisons",
    "paired_difference",
    "parse_sweep",
    "plan_runs",
    "run_sweep",
    "write_plots",
    "write_report",
]

#: Top-level keys of a sweep file.
SWEEP_KEYS = frozenset({
    "title", "description", "base", "seeds", "defaults", "grids", "launcher", "threads",
    "keep_checkpoints", "resume",
})
#: Keys of one grid.
GRID_KEYS = frozenset({"title", "values", "labels", "compare_to"})
#: The config key whose grids get paired comparisons against reference variants.
VARIANT_KEY = "model.variant"
#: Reference variants of a variant grid that names no ``compare_to``, when it has them.
DEFAULT_REFERENCES = ("plain", "baseline")
#: The metric the paired-difference tables show (results.json has every shared metric).
COMPARE_METRIC = "test/combined_top1"
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
        compare_to: Reference variants (values of ``model.variant`` in this grid) that every
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
            if key == "model.variant" and text in VARIANT_LABELS:
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
    """``model.delta`` -> ``delta``: the last component of a config key."""
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


def cli_value(value: Any) -> str:
    """A value as the text of a ``--key=value`` flag that jsonargparse parses back to it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return value
    return json.dumps(value)


def _canonical(value: Any) -> Any:
    """Numbers compare by value (``1`` and ``1.0`` are the same setting); bools stay bools."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, list | tuple):
        return [_canonical(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in sorted(value.items())}
    return value


def _check_key(key: Any, where: str) -> str:
    if not isinstance(key, str) or not _KEY_RE.match(key):
        raise SweepError(
            f"{where}: {key!r} is not a config key; use the dotted key of a `crasmra fit` flag "
            "under model., data., trainer. or checkpoint. (e.g. model.delta, data.options)."
        )
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
        _check_key(key, f"{where}: defaults")
        _check_scalar_or_config(value, f"{where}: defaults.{key}")

    grids_data = data["grids"]
    if not isinstance(grids_data, dict) or not grids_data:
        raise SweepError(f"{where}: `grids` must map grid names to grids, e.g. "
                         "`grids: {delta: {values: {model.delta: [0.5, 0.9]}}}`.")
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
                         "e.g. `values: {model.delta: [0.5, 0.9]}`.")
    for key, options in values.items():
        _check_key(key, where)
        if not isinstance(options, list) or not options:
            raise SweepError(f"{where}: {key} must be a non-empty list of values, got {options!r}.")
        for value in options:
            _check_scalar_or_config(value, f"{where}: {key}")
        canon = [json.dumps(_canonical(v), sort_keys=True) for v in options]
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
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise SweepError(f"{path} is not valid YAML: {err}") from err
    return parse_sweep(data, source=path)


# ---------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------
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

    def fit_args(self, base: str | dict[str, Any], root: Path, extra: Sequence[str] = (),
                 resume: bool = False) -> list[str]:
        """Arguments of ``crasmra fit`` for this run, writing into ``root``."""
        config = base if isinstance(base, str) else yaml.safe_dump(base, sort_keys=False)
        args = ["fit", f"--config={config}"]
        args += [f"--{k}={cli_value(v)}" for k, v in self.overrides]
        args += [f"--seed_everything={self.seed}", f"--trainer.default_root_dir={root}"]
        args += list(extra)
        # A run that is not resumed starts over in its own folder, replacing what an
        # interrupted attempt left there.
        args.append("--ckpt_path=last" if resume else "--overwrite=true")
        return args


def setting_key(overrides: dict[str, Any]) -> str:
    """Identity of a setting: its overrides with numbers compared by value."""
    return json.dumps({k: _canonical(v) for k, v in sorted(overrides.items())}, sort_keys=True)


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


def base_fingerprint(base: str | dict[str, Any]) -> str:
    """A hash of the base config's content (``__base__`` chains merged), not of its path."""
    import hashlib

    if isinstance(base, str):
        from crasmra.config import load_config

        base = load_config(base)
    text = json.dumps(_canonical(base), sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def check_same_base(spec: SweepSpec, out: Path, runs: Sequence[RunSpec]) -> None:
    """Refuse an output folder whose runs were trained from another base config.

    Run folders are named after their overrides only; skipping a finished run trained from a
    different base would silently mix two experiments in one table.

    Raises:
        SweepError: Some run in ``out`` records another base config fingerprint.
    """
    current = base_fingerprint(spec.base)
    for run in runs:
        try:
            recorded = json.loads((out / run.folder / RUN_FILE).read_text()).get("base_fingerprint")
        except (OSError, json.JSONDecodeError):
            continue
        if recorded not in (None, current):
            raise SweepError(
                f"{out / run.folder} was trained from a different base config than {spec.title!r} "
                "now has; use another --out, or delete that folder to retrain it."
            )


def validate_settings(spec: SweepSpec, runs: Sequence[RunSpec], extra: Sequence[str] = ()) -> None:
    """Parse every distinct setting with the `crasmra fit` parser, instantiating nothing.

    Catches misspelt keys and values of the wrong type before any run starts.

    Raises:
        SweepError: A setting does not parse; the message names the setting and the parser's error.
    """
    from crasmra.config import expand_config_args
    from crasmra.data import FGVCDataModule
    from crasmra.engine import CRASMRAModule
    from crasmra.flags import check_class_paths
    from crasmra.lightning_private import ParseOnly
    from crasmra.runner import make_cli_class

    seen: set[str] = set()

    class _ParseOnly(ParseOnly, make_cli_class()):  # type: ignore[misc]
        """The fit command's parser (same class, same links) with every action removed."""

    cli = None
    for run in runs:
        if run.setting_name in seen:
            continue
        seen.add(run.setting_name)
        # The same `__base__` resolution as `crasmra fit` (cli.run_lightning) applies.
        args = expand_config_args(run.fit_args(spec.base, Path("sweep-validation"), extra))
        check_class_paths(args)
        stderr = io.StringIO()
        try:
            with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
                if cli is None:
                    cli = _ParseOnly(CRASMRAModule, FGVCDataModule, args=args)
                else:  # building the parser is the slow part: parse with the same one
                    cli.parser.parse_args(args)
        except SystemExit as err:
            lines = [ln for ln in stderr.getvalue().splitlines() if ln.strip()]
            reason = next((ln for ln in reversed(lines) if "error:" in ln), lines[-1] if lines else
                          f"exit status {err.code}")
            raise SweepError(
                f"setting {run.setting_name} does not parse as `crasmra fit` arguments: "
                f"{reason.split('error:', 1)[-1].strip()}"
            ) from None


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------
def _run_in_process(args: list[str]) -> None:
    """Run one fit in this process; a Ctrl-C that Lightning absorbed is raised again."""
    from crasmra.runner import run_lightning

    # The folder already holds the sweep's own sweep_run.json; nothing of Lightning's is lost.
    warnings.filterwarnings("ignore", message=r"Experiment logs directory .* is not empty")
    handler = signal.getsignal(signal.SIGINT)
    try:
        run_lightning(args)
    finally:
        # On Ctrl-C Lightning ignores further SIGINTs and exits with status 1; a sweep must
        # stop there instead of treating it as one failed run and starting the next.
        interrupted = (signal.getsignal(signal.SIGINT) == signal.SIG_IGN
                       and handler != signal.SIG_IGN)
        if interrupted:
            signal.signal(signal.SIGINT, handler)
    if interrupted:
        raise KeyboardInterrupt


#: Starts ``crasmra.cli`` in a child Python without the working folder on its import path:
#: ``python -m`` puts the working folder first, so a ``timm.py`` or ``torch.py`` lying there
#: would be imported instead of the library. ``-P`` (Python 3.11+) leaves it out; before 3.11
#: the path entry is removed before anything is imported.
CHILD_COMMAND: tuple[str, ...] = (
    (sys.executable, "-P", "-m", "crasmra.cli")
    if sys.version_info >= (3, 11)
    else (sys.executable, "-c",
          "import sys; del sys.path[0]; from crasmra.cli import main; sys.exit(main())")
)


def _run_subprocess(args: list[str], log_path: Path) -> None:
    """Run one fit in a child process (:data:`CHILD_COMMAND`), its output in ``log_path``."""
    with log_path.open("a") as log_file:
        proc = subprocess.run([*CHILD_COMMAND, *args], stdout=log_file,
                              stderr=subprocess.STDOUT, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"`crasmra fit` exited with status {proc.returncode}; see {log_path}")


def _clean_for_fresh_start(run_dir: Path) -> None:
    # metrics.json is merged into, not replaced, by the callback that writes it: a failed
    # attempt's entries must not leak into the new run.
    for name in ("metrics.json", "error.txt"):
        (run_dir / name).unlink(missing_ok=True)


def run_sweep(
    spec: SweepSpec,
    out: str | Path,
    *,
    extra_args: Sequence[str] = (),
    groups: Iterable[str] | None = None,
    seeds: Iterable[int] | None = None,
    dry_run: bool = False,
    validate: bool = True,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run every unfinished run of a sweep into ``out``.

    Args:
        spec: The sweep.
        out: Output folder; run folders go to ``out/runs``.
        extra_args: ``crasmra fit`` flags added to every run that do not change its result
            (``--data.root``, ``--trainer.devices``...); they are not part of a run's identity.
        groups: Only run these grids (default: all).
        seeds: Only run these of the sweep's seeds (default: all). Processes or machines that
            share ``out`` can each take some seeds: their runs are disjoint, and run folders
            are named as in the whole sweep.
        dry_run: List what would run, run nothing.
        validate: Parse every setting with the fit parser before running anything.
        echo: Where progress lines go.

    Returns:
        ``{"runs": n, "finished": n, "ran": n, "failed": [folders], "wall_s": seconds}``.
    """
    out = Path(out)
    spec = _select(spec, groups)
    runs, _ = plan_runs(spec)
    if seeds is not None:
        wanted = list(seeds)
        unknown = sorted(set(wanted) - set(spec.seeds))
        if unknown:
            raise SweepError(f"seed(s) {unknown} are not in the sweep's seeds {spec.seeds}.")
        runs = [run for run in runs if run.seed in wanted]
    if validate:
        validate_settings(spec, runs, extra_args)
    check_same_base(spec, out, runs)
    todo = [r for r in runs if not is_finished(out / r.folder)]
    n_settings, n_seeds = len({r.setting_name for r in runs}), len({r.seed for r in runs})
    echo(f"{spec.title}: {len(runs)} runs ({n_settings} settings x {n_seeds} seeds), "
         f"{len(runs) - len(todo)} already finished, {len(todo)} to run.")
    summary: dict[str, Any] = {"runs": len(runs), "finished": len(runs) - len(todo), "ran": 0,
                               "failed": [], "wall_s": 0.0}
    if dry_run:
        for run in todo:
            echo(f"  would run {run.folder}")
        return summary
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.yaml").write_text(yaml.safe_dump(spec.to_dict(), sort_keys=False))
    fingerprint = base_fingerprint(spec.base)
    start = time.perf_counter()
    # The sweep's thread count reaches every run, whichever launcher starts it.
    threads = [f"--threads={spec.threads}"] if spec.threads is not None else []
    run_flags = [*extra_args, *threads]
    for i, run in enumerate(todo, 1):
        run_dir = (out / run.folder).resolve()
        run_dir.mkdir(parents=True, exist_ok=True)
        resume = spec.resume and (run_dir / "checkpoints" / "last.ckpt").is_file()
        if not resume:
            _clean_for_fresh_start(run_dir)
        args = run.fit_args(spec.base, run_dir, run_flags, resume=resume)
        record = {"setting": dict(run.overrides), "seed": run.seed, "args": args,
                  "base_fingerprint": fingerprint, "launcher": spec.launcher,
                  "resumed": resume, "status": "running"}
        write_json_atomic(run_dir / RUN_FILE, record)
        echo(f"[{i}/{len(todo)}] {run.folder}{' (resuming)' if resume else ''}")
        t0 = time.perf_counter()
        try:
            if spec.launcher == "in-process":
                _run_in_process(args)
            else:
                _run_subprocess(args, run_dir / "sweep.log")
            if not is_finished(run_dir):
                raise RuntimeError("the run ended without test results in metrics.json")
        except KeyboardInterrupt:
            record.update(status="interrupted", wall_s=round(time.perf_counter() - t0, 1))
            write_json_atomic(run_dir / RUN_FILE, record)
            echo("Interrupted: run the same command again to continue the sweep.")
            raise
        except (Exception, SystemExit) as err:  # one failed run must not end the sweep
            wall = round(time.perf_counter() - t0, 1)
            (run_dir / "error.txt").write_text("".join(traceback.format_exception(err)))
            record.update(status="failed", wall_s=wall, error=f"{type(err).__name__}: {err}")
            write_json_atomic(run_dir / RUN_FILE, record)
            summary["failed"].append(str(run.folder))
            echo(f"    FAILED after {wall:.0f} s: {type(err).__name__}: {err} "
                 f"(traceback in {run_dir / 'error.txt'})")
            continue
        wall = round(time.perf_counter() - t0, 1)
        record.update(status="finished", wall_s=wall)
        write_json_atomic(run_dir / RUN_FILE, record)
        if not spec.keep_checkpoints:
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        summary["ran"] += 1
        test = (read_metrics(run_dir) or {}).get("test", {})
        combined = test.get("test/combined_top1")
        score = f", test combined top-1 {100 * combined:.1f}%" if combined is not None else ""
        echo(f"    finished in {wall:.0f} s{score}")
    summary["wall_s"] = round(time.perf_counter() - start, 1)
    return summary


def _select(spec: SweepSpec, groups: Iterable[str] | None) -> SweepSpec:
    if groups is None:
        return spec
    wanted = list(groups)
    names = [g.name for g in spec.grids]
    unknown = [g for g in wanted if g not in names]
    if unknown:
        raise SweepError(f"no grid named {', '.join(unknown)}; the sweep has {', '.join(names)}.")
    from dataclasses import replace

    return replace(spec, grids=[g for g in spec.grids if g.name in wanted])


# ---------------------------------------------------------------------------------------------
# Collecting and aggregating
# ---------------------------------------------------------------------------------------------
def collect(spec: SweepSpec, out: str | Path) -> dict[str, dict[int, dict[str, float]]]:
    """The finished runs' metrics: setting name -> seed -> flat metrics.

    The flat metrics are the test metrics (``test/...``) and the validation metrics of the
    best epoch (``val/...``), as fractions.
    """
    out = Path(out)
    runs, _ = plan_runs(spec)
    results: dict[str, dict[int, dict[str, float]]] = {}
    for run in runs:
        metrics = read_metrics(out / run.folder)
        if not metrics or not metrics.get("test"):
            continue
        flat = dict(metrics["test"])
        flat.update((metrics.get("best_val") or {}).get("metrics") or {})
        results.setdefault(run.setting_name, {})[run.seed] = flat
    return results


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1 in the denominator; 0 for a single value)."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    mean = sum(values) / n
    if n == 1:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def aggregate(per_seed: dict[int, dict[str, float]]) -> dict[str, dict[str, Any]]:
    """Mean ± sample std over seeds of every metric: name -> {mean, std, n, values}."""
    names = sorted({k for metrics in per_seed.values() for k in metrics})
    summary = {}
    for name in names:
        seeds = sorted(s for s, m in per_seed.items() if name in m)
        values = [per_seed[s][name] for s in seeds]
        mean, std = mean_std(values)
        summary[name] = {"mean": mean, "std": std, "n": len(values), "seeds": seeds,
                         "values": values}
    return summary


def head_names(metric_names: Iterable[str]) -> list[str]:
    """Heads with a top-1 test metric, in the paper's column order: stages, concat, combined."""
    heads = {k[len("test/"):-len("_top1")] for k in metric_names
             if k.startswith("test/") and k.endswith("_top1")}
    # The plain variant's one head ("classifier") sits after the stage heads, before concat.
    return sorted(heads, key=lambda h: (h == "combined", h == "concat", h == "classifier", h))


def paired_difference(values: dict[int, float], reference: dict[int, float],
                      level: float = 0.95) -> dict[str, Any]:
    """Mean paired difference ``values[s] - reference[s]`` over the seeds both have, with a CI.

    The interval is Student's t over the per-seed differences: ``mean ± t(1 - (1 - level) / 2,
    n - 1) * sd / sqrt(n)``, ``sd`` the sample standard deviation of the differences.

    Args:
        values: Seed -> metric of the compared setting.
        reference: Seed -> metric of the reference setting.
        level: Confidence level of the interval.

    Returns:
        ``{"n", "seeds", "differences", "mean", "std", "ci_low", "ci_high", "level"}``; ``mean``
        is None without a shared seed, ``std`` and the interval are None with fewer than two.
    """
    seeds = sorted(set(values) & set(reference))
    diffs = [values[s] - reference[s] for s in seeds]
    n = len(diffs)
    result: dict[str, Any] = {"n": n, "seeds": seeds, "differences": diffs, "mean": None,
                              "std": None, "ci_low": None, "ci_high": None, "level": level}
    if n == 0:
        return result
    mean, std = mean_std(diffs)
    result["mean"] = mean
    if n >= 2:
        from scipy import stats

        half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * std / math.sqrt(n)
        result.update(std=std, ci_low=mean - half, ci_high=mean + half)
    return result


def paired_comparisons(grid: Grid, rows: Sequence[tuple[dict[str, Any], str]],
                       collected: dict[str, dict[int, dict[str, float]]]) -> list[dict[str, Any]]:
    """Each setting of a variant grid against each reference variant, paired by seed.

    A row's reference is the grid point that differs from it only in ``model.variant``, so in
    a grid of variants x another key every value of that key is compared separately.

    Returns:
        One entry per reference: ``{"reference", "label", "metric", "rows"}``; each row holds
        ``label``, ``point``, ``setting``, ``reference_setting`` and, per metric both settings
        report, the :func:`paired_difference` (fractions, not percent).
    """
    names = {setting_key(point): name for point, name in rows}
    comparisons = []
    for ref in grid.compare_to:
        table = []
        for point, name in rows:
            if point.get(VARIANT_KEY) == ref:
                continue
            ref_name = names[setting_key({**point, VARIANT_KEY: ref})]
            mine, theirs = collected.get(name, {}), collected.get(ref_name, {})
            shared = sorted({k for m in mine.values() for k in m}
                            & {k for m in theirs.values() for k in m})
            metrics = {
                metric: paired_difference(
                    {s: m[metric] for s, m in mine.items() if metric in m},
                    {s: m[metric] for s, m in theirs.items() if metric in m})
                for metric in shared
            }
            table.append({"label": grid.label(point), "point": point, "setting": name,
                          "reference_setting": ref_name, "metrics": metrics})
        label = grid.label({VARIANT_KEY: ref}) if len(grid.values) == 1 else f"`{ref}`"
        comparisons.append({"reference": ref, "label": label, "metric": COMPARE_METRIC,
                            "rows": table})
    return comparisons


def build_results(spec: SweepSpec, out: str | Path) -> dict[str, Any]:
    """Per grid, its rows (label, setting, aggregated metrics) from the finished runs in ``out``.

    Grids that vary ``model.variant`` also get ``comparisons``: every variant's paired
    differences against each of the grid's ``compare_to`` variants (:func:`paired_comparisons`).
    """
    runs, rows = plan_runs(spec)
    collected = collect(spec, out)
    grids = []
    for grid in spec.grids:
        table = []
        for point, name in rows[grid.name]:
            per_seed = collected.get(name, {})
            table.append({"label": grid.label(point), "point": point, "setting": name,
                          "metrics": aggregate(per_seed)})
        grids.append({"name": grid.name, "title": grid.title, "keys": list(grid.values),
                      "rows": table, "compare_to": list(grid.compare_to),
                      "comparisons": paired_comparisons(grid, rows[grid.name], collected)})
    return {"title": spec.title, "description": spec.description, "seeds": spec.seeds,
            "runs_planned": len(runs),
            "runs_finished": sum(len(v) for v in collected.values()), "grids": grids}


# ---------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------
def _cell(stats: dict[str, Any] | None, n_seeds: int, bold: bool = False) -> str:
    if not stats or stats["n"] == 0:
        return ""
    text = f"{100 * stats['mean']:.1f}"
    if stats["n"] > 1:
        text += f" ± {100 * stats['std']:.1f}"
    if bold:
        text = f"**{text}**"
    if stats["n"] < n_seeds:
        text += f" (n={stats['n']})"
    return text


def format_table(grid: dict[str, Any], n_seeds: int, monitor: str = "test/combined_top1") -> str:
    """One grid as a markdown table: a row per setting, test top-1 per head, val combined.

    The val column is left out when no run has validation metrics (runs trained on the whole
    training split and tested at their final epoch).
    """
    names = {k for row in grid["rows"] for k in row["metrics"]}
    heads = head_names(names) or ["combined"]
    has_val = "val/combined_top1" in names
    best = max((row["metrics"][monitor]["mean"] for row in grid["rows"]
                if monitor in row["metrics"]), default=None)
    key = short_key(grid["keys"][0]) if len(grid["keys"]) == 1 else "setting"
    header = [key, *[f"{h} (test)" for h in heads], *(["combined (val)"] if has_val else []),
              "seeds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in grid["rows"]:
        m = row["metrics"]
        cells = [row["label"]]
        for head in heads:
            name = f"test/{head}_top1"
            is_best = name == monitor and best is not None and name in m and m[name]["mean"] == best
            cells.append(_cell(m.get(name), n_seeds, bold=is_best))
        if has_val:
            cells.append(_cell(m.get("val/combined_top1"), n_seeds))
        cells.append(str(max((s["n"] for s in m.values()), default=0)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_markdown(results: dict[str, Any], plots: dict[str, str] | None = None) -> str:
    """The whole report: a heading, a table per grid and the plots' links."""
    n_seeds = len(results["seeds"])
    seeds = ", ".join(map(str, results["seeds"]))
    parts = [f"# {results['title']}", ""]
    if results["description"]:
        parts += [results["description"], ""]
    has_val = any("val/combined_top1" in row["metrics"]
                  for grid in results["grids"] for row in grid["rows"])
    checkpoint = (
        "of the checkpoint with the best validation combined top-1; the val column is that "
        "epoch's validation combined top-1." if has_val else
        "of each run's final epoch (trained on the whole training split, no validation split)."
    )
    parts += [
        f"Top-1 accuracy in %, mean ± sample standard deviation over {n_seeds} seeds "
        f"({seeds}); {results['runs_finished']} of {results['runs_planned']} runs finished. "
        "Test columns: each head and the combined prediction (mean of the heads' softmaxes) "
        f"{checkpoint} Bold: the best test combined mean of the table.",
        "",
    ]
    for grid in results["grids"]:
        parts += [f"## {grid['title']}", "", format_table(grid, n_seeds), ""]
        if plots and grid["name"] in plots:
            parts += [f"![{grid['title']}]({plots[grid['name']]})", ""]
        for i, comparison in enumerate(grid.get("comparisons", [])):
            parts += [f"### {grid['title']}: vs {comparison['label']}", ""]
            if i == 0:
                parts += [
                    "Paired by seed (the same seed gives the same data order and, where the "
                    "shapes allow, the same initial weights): for every seed finished by both "
                    "settings, the setting's test combined top-1 minus the reference's, in "
                    "percentage points. Mean and 95% confidence interval over those differences "
                    "(Student t, n - 1 degrees of freedom); n/a with a single pair.",
                    "",
                ]
            key = "variant" if len(grid["keys"]) == 1 else "setting"
            parts += [format_comparison(comparison, key), ""]
    return "\n".join(parts).rstrip() + "\n"


def format_comparison(comparison: dict[str, Any], key: str = "variant") -> str:
    """One reference's paired differences as a markdown table (percentage points).

    Args:
        comparison: An entry of a grid's ``comparisons`` (see :func:`paired_comparisons`).
        key: Heading of the first column.
    """
    metric = comparison["metric"]
    header = [key, "Δ test combined top-1", "95% CI", "pairs", "per seed"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in comparison["rows"]:
        stats = row["metrics"].get(metric)
        if not stats or not stats["n"]:
            cells = ["", "", "0", ""]
        else:
            ci = ("n/a" if stats["ci_low"] is None
                  else f"[{100 * stats['ci_low']:+.1f}, {100 * stats['ci_high']:+.1f}]")
            per_seed = ", ".join(f"{s}: {100 * d:+.1f}"
                                 for s, d in zip(stats["seeds"], stats["differences"], strict=True))
            cells = [f"{100 * stats['mean']:+.1f}", ci, str(stats["n"]), per_seed]
        lines.append("| " + " | ".join([row["label"], *cells]) + " |")
    return "\n".join(lines)


def write_plots(results: dict[str, Any], folder: str | Path) -> dict[str, str]:
    """A PNG per grid: accuracy against a numeric value (lines) or per setting (bars).

    Error bars are the sample std over seeds; dots are the single seeds.

    Returns:
        Grid name -> path of its plot relative to ``folder``'s parent (for markdown links).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for grid in results["grids"]:
        rows = [r for r in grid["rows"] if "test/combined_top1" in r["metrics"]]
        if not rows:
            continue
        names = {k for r in rows for k in r["metrics"]}
        heads = head_names(names)
        fig = Figure(figsize=(6.4, 4.0), dpi=110)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        numeric = len(grid["keys"]) == 1 and all(
            isinstance(r["point"][grid["keys"][0]], int | float)
            and not isinstance(r["point"][grid["keys"][0]], bool) for r in rows)
        if numeric:
            xs = [float(r["point"][grid["keys"][0]]) for r in rows]
            ax.set_xlabel(grid["keys"][0])
            ax.set_xticks(xs)
            gaps = [b - a for a, b in zip(sorted(xs), sorted(xs)[1:], strict=False)]
            dodge = 0.05 * min(gaps, default=1.0)
        else:
            xs = [float(i) for i in range(len(rows))]
            ax.set_xticks(xs, [r["label"].split(" (`")[0] for r in rows], rotation=15, ha="right")
            dodge = 0.1
        for i, head in enumerate(heads):
            name = f"test/{head}_top1"
            # Heads side by side around each x, so their error bars do not hide each other.
            shift = (i - (len(heads) - 1) / 2) * dodge
            pts = [(x + shift, r["metrics"][name]) for x, r in zip(xs, rows, strict=True)
                   if name in r["metrics"]]
            if not pts:
                continue
            combined = head == "combined"
            ys = [100 * s["mean"] for _, s in pts]
            es = [100 * s["std"] for _, s in pts]
            style = ({"lw": 2.2, "color": "black", "zorder": 3} if combined
                     else {"lw": 1, "alpha": 0.8})
            ax.errorbar([x for x, _ in pts], ys, yerr=es, capsize=3, marker="o", ms=4,
                        label=head, ls="-" if numeric else "none", **style)
            if combined:
                for x, s in pts:
                    ax.scatter([x] * len(s["values"]), [100 * v for v in s["values"]], s=10,
                               color="black", alpha=0.35, zorder=2)
        ax.set_ylabel("test top-1 (%)")
        ax.set_title(grid["title"], fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, ncols=2)
        fig.tight_layout()
        path = folder / f"{grid['name']}.png"
        # No software/date metadata, so re-running the report gives the same bytes.
        fig.savefig(path, metadata={"Software": None})
        written[grid["name"]] = f"{folder.name}/{path.name}"
    return written


def write_report(spec: SweepSpec, out: str | Path, report: str | Path | None = None,
                 groups: Iterable[str] | None = None) -> dict[str, Any]:
    """Collect ``out``'s finished runs and write ``results.md``, ``results.json`` and plots.

    Returns:
        The results mapping written to ``results.json``.
    """
    spec = _select(spec, groups)
    report = Path(report) if report is not None else Path(out)
    report.mkdir(parents=True, exist_ok=True)
    results = build_results(spec, out)
    plots = write_plots(results, report / "plots")
    (report / "results.md").write_text(format_markdown(results, plots))
    write_json_atomic(report / "results.json", results)
    return results
