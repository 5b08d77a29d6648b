"""Where the training module's options went when they became typed parts.

``crasmra fit`` once took every option of the training module flat (``--model.omega``,
``--model.lr_heads``, ...). They now sit in the part they belong to (``--model.net.omega``,
``--model.optim.lr_heads``): :data:`MOVED_KEYS` maps each old name to its part. An old flag,
or an old key in a YAML config or a sweep file, is refused with one line that names its new
place; checkpoints written with the flat layout are read through :func:`nest_flat_hparams`.

This module imports neither torch nor Lightning.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from crasmra.errors import UsageError

__all__ = [
    "MOVED_KEYS",
    "PARTS",
    "flat_model_section",
    "legacy_key",
    "moved_message",
    "nest_flat_hparams",
    "refuse_moved_flags",
]

#: The training module's parts, in the order of its constructor.
PARTS: tuple[str, ...] = ("net", "loss", "optim", "finetune", "runtime")

#: Old flat option of the training module -> the part it now belongs to.
MOVED_KEYS: dict[str, str] = {
    **dict.fromkeys(
        ("backbone", "num_classes", "variant", "pretrained", "omega", "delta", "reduction",
         "head_channels", "head_hidden", "head_pool", "conv_layer", "suppress_source",
         "stage_indices", "attention_options", "final_features", "head_weights"),
        "net",
    ),
    **dict.fromkeys(("alpha", "beta", "gamma"), "loss"),
    **dict.fromkeys(
        ("lr_backbone", "lr_attention", "lr_heads", "lr_smram", "momentum", "weight_decay",
         "nesterov", "warmup_epochs", "min_lr_ratio"),
        "optim",
    ),
    **dict.fromkeys(
        ("freeze_backbone_epochs", "freeze_backbone_bn", "head_init", "head_path_init",
         "imprint_logit_scale", "imprint_centered", "combine", "suppression_warmup_epochs"),
        "finetune",
    ),
    **dict.fromkeys(
        ("channels_last", "compile", "nonfinite_loss", "nonfinite_check_interval", "init_from",
         "reinit_heads"),
        "runtime",
    ),
}


def moved_message(key: str, prefix: str = "--") -> str | None:
    """``"--model.omega is now --model.net.omega"`` for an old key (``model.omega``), else None.

    Args:
        key: A dotted config key, without leading dashes.
        prefix: What precedes the key in the message (``"--"`` for flags, ``""`` for keys).
    """
    section, _, name = key.partition(".")
    if section != "model" or name not in MOVED_KEYS:
        return None
    return f"{prefix}{key} is now {prefix}model.{MOVED_KEYS[name]}.{name}"


def _model_keys(config: Any) -> Iterable[str]:
    """The old keys of a config mapping's ``model`` section (one in a subcommand's too)."""
    if not isinstance(config, Mapping):
        return
    for section in (config, *(v for k, v in config.items() if k in ("fit", "validate", "test"))):
        model = section.get("model") if isinstance(section, Mapping) else None
        if isinstance(model, Mapping):
            init_args = model.get("init_args")
            for name in (*model, *(init_args if isinstance(init_args, Mapping) else ())):
                if name in MOVED_KEYS:
                    yield f"model.{name}"


def _yaml_mapping(text: str) -> Any:
    import yaml

    from crasmra.config import load_yaml

    try:
        return load_yaml(text, "a config")
    except yaml.YAMLError:
        return None  # the parser reports it


def refuse_moved_flags(args: Sequence[str] | Mapping[str, Any]) -> None:
    """Refuse, in one line, an old flat option of the training module.

    Looks at ``--model.NAME`` flags, at the ``model`` section of ``--config`` files and
    texts and of ``--model`` values, and at a parsed config mapping.

    Raises:
        UsageError: ``"--model.omega is now --model.net.omega"`` (or the key's form for
            config files).
    """
    from pathlib import Path

    if isinstance(args, Mapping):
        for key in _model_keys(args):
            raise UsageError(f"{moved_message(key, '')} (config key).")
        return
    items = list(args)
    for i, arg in enumerate(items):
        if not arg.startswith("--"):
            continue
        key, has_value, value = arg[2:].partition("=")
        message = moved_message(key.rstrip("+"))
        if message:
            raise UsageError(message)
        if not has_value:
            value = items[i + 1] if i + 1 < len(items) else ""
        if key in ("config", "model"):
            try:
                is_file = "\n" not in value and Path(value).is_file()
            except OSError:  # a YAML text too long for a path
                is_file = False
            text = Path(value).read_text() if is_file else value
            mapping = _yaml_mapping(text)
            if key == "model":
                mapping = {"model": mapping}
            for old in _model_keys(mapping):
                where = f" in {value}" if is_file else ""
                raise UsageError(f"{moved_message(old, '')}{where} (config key).")


def legacy_key(key: str) -> str:
    """The flat key a part's key had before the move: ``model.net.omega`` -> ``model.omega``.

    Sweeps identify their runs by these, so that runs finished before the move are found.
    """
    parts = key.split(".")
    if len(parts) == 3 and parts[0] == "model" and MOVED_KEYS.get(parts[2]) == parts[1]:
        return f"model.{parts[2]}"
    return key


def flat_model_section(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` with its ``model`` section's parts merged into one flat mapping (the layout
    before the move), for fingerprints that must not change with it."""
    out = dict(config)
    model = out.get("model")
    if isinstance(model, Mapping):
        flat = {k: v for k, v in model.items()
                if not (k in PARTS and isinstance(v, Mapping))}
        for part in PARTS:
            values = model.get(part)
            if isinstance(values, Mapping):
                flat.update(values)
        out["model"] = flat
    return out


def nest_flat_hparams(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """A training module's hyperparameters in the parts layout, from either layout.

    Flat keys (a checkpoint written before the move) go to their part; other keys
    (``classes``, ``transform_config``) stay where they are. Parts already nested pass
    through unchanged.
    """
    nested: dict[str, Any] = {}
    for key, value in hparams.items():
        part = MOVED_KEYS.get(key)
        if part is None:
            if key in PARTS and isinstance(value, Mapping):
                nested.setdefault(key, {}).update(value)
            else:
                nested[key] = value
        else:
            nested.setdefault(part, {})[key] = value
    return nested
