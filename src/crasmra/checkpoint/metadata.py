"""The ``"crasmra"`` entry of a checkpoint and the data settings stored with it, checked.

Every number that sizes a network or an image must be an integer within generous limits, so
a damaged or hostile file is refused with a message before anything is built from it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from crasmra.checkpoint.format import (
    FORMAT_VERSION,
    MAX_CLASSES,
    MAX_HEAD_WIDTH,
    MAX_IMAGE_SIDE,
    CheckpointError,
    network_hparams,
)

__all__ = ["STORED_DATA_KEYS", "check_data_settings", "checkpoint_metadata", "validate_metadata"]


def checkpoint_metadata(ckpt: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """The ``"crasmra"`` entry of a loaded checkpoint, validated.

    Raises:
        CheckpointError: The file was not written by crasmra or by an incompatible version.
    """
    meta = ckpt.get("crasmra")
    if not isinstance(meta, dict) or "net_config" not in meta:
        raise CheckpointError(
            f"{path} was not written by crasmra (it has no 'crasmra' entry describing the "
            "network). Pass a checkpoint from `crasmra fit` or `crasmra demo`; to start from "
            "plain backbone weights use --model.net.pretrained PATH instead."
        )
    validate_metadata(ckpt, path)
    if not isinstance(meta["net_config"], dict):
        raise _damaged(path, "'net_config' is not a dictionary")
    return meta


def _short(value: Any) -> str:
    try:
        text = repr(value)
    except RecursionError:
        return "(a value nested too deeply to show)"
    return text if len(text) <= 60 else text[:57] + "..."


def _damaged(path: str | Path, what: str) -> CheckpointError:
    return CheckpointError(
        f"{path} has damaged metadata: {what}. The file was altered or damaged; use the "
        "checkpoint as `crasmra fit` wrote it (or an earlier one)."
    )


def _check_int(value: Any, name: str, high: int, path: str | Path) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
        raise _damaged(path, f"{name} is {_short(value)}, expected an integer in 1..{high}")


def _check_size(value: Any, name: str, path: str | Path) -> None:
    sides = list(value) if isinstance(value, list | tuple) else [value]
    if len(sides) not in (1, 2):
        raise _damaged(path, f"{name} is {_short(value)}, expected a size or [height, width]")
    for side in sides:
        _check_int(side, name, MAX_IMAGE_SIDE, path)


def _check_network_numbers(config: dict[str, Any], where: str, path: str | Path) -> None:
    if "num_classes" in config:
        _check_int(config["num_classes"], f"{where}.num_classes", MAX_CLASSES, path)
    for key in ("head_channels", "head_hidden", "reduction"):
        if key in config:
            _check_int(config[key], f"{where}.{key}", MAX_HEAD_WIDTH, path)
    for key in ("backbone", "variant"):
        if key in config and not isinstance(config[key], str):
            raise _damaged(path, f"{where}.{key} is {_short(config[key])}, expected a name")
    # CRAM's factors: the network is rebuilt with them, and test and resume take omega
    # from here (--model.finetune.cram_suppression trained records it per run).
    for key, low_open in (("omega", False), ("delta", True)):
        value = config.get(key)
        if value is None:
            continue
        if (isinstance(value, bool) or not isinstance(value, int | float)
                or not (0 < value <= 1 if low_open else 0 <= value <= 1)):
            interval = "(0, 1]" if low_open else "[0, 1]"
            raise _damaged(path, f"{where}.{key} is {_short(value)}, expected a number in "
                                 f"{interval}")


def _check_transform(config: Any, where: str, path: str | Path) -> None:
    if config is None:
        return
    if not isinstance(config, dict):
        raise _damaged(path, f"'{where}' is {type(config).__name__}, expected a dictionary")
    for key in ("image_size", "resize_size"):
        if config.get(key) is not None:
            _check_size(config[key], f"{where}.{key}", path)
    _check_normalization(config, where, path)


def _check_normalization(config: dict[str, Any], where: str, path: str | Path) -> None:
    # A NaN, an infinite or an absurd mean or std would make every prediction NaN (predict
    # printing "nan%") or meaningless while the run exits 0.
    from crasmra.data.transforms import (
        IMAGENET_DEFAULT_MEAN,
        IMAGENET_DEFAULT_STD,
        check_normalization,
    )

    if config.get("mean") is None and config.get("std") is None:
        return
    try:
        check_normalization(config.get("mean", IMAGENET_DEFAULT_MEAN),
                            config.get("std", IMAGENET_DEFAULT_STD))
    except ValueError as err:
        raise _damaged(path, f"{where}: {err}") from None


#: Data settings that select a checkpoint's evaluation images and their transform, the ones
#: an evaluation takes from the checkpoint (``crasmra test``/``validate`` without data
#: options, ``report``, ``serve``'s examples). Loading settings (batch size, workers) are not
#: taken from a file: they are the command's own.
STORED_DATA_KEYS = ("dataset", "root", "val_fraction", "split_seed", "options", "image_size",
                    "resize_size", "mean", "std", "decode_backend", "normalize_on_device",
                    "skip_bad_images", "train_per_class", "subset_seed")


def check_data_settings(settings: Any, path: str | Path) -> dict[str, Any]:
    """The data settings stored with a checkpoint (or in its run folder's ``config.yaml``),
    checked as the command line checks the same values.

    Types, ranges and finiteness are checked for every key of :data:`STORED_DATA_KEYS` (the
    others are dropped); the synthetic set's options with
    :func:`crasmra.data.synthetic.check_synthetic_options`, sizes within ``MAX_IMAGE_SIDE``,
    the normalisation with :func:`crasmra.data.transforms.check_normalization`. So a file
    cannot make an evaluation allocate without bound, hang or fail in a loader worker.

    Returns:
        The checked settings, with only the keys of :data:`STORED_DATA_KEYS`.

    Raises:
        CheckpointError: A setting has the wrong type or an absurd value.
    """
    from crasmra.data import dataset_names
    from crasmra.data.synthetic import check_synthetic_options

    if not isinstance(settings, dict):
        raise _damaged(path, f"its data settings are {type(settings).__name__}, not a "
                             "dictionary")
    out = {k: settings[k] for k in STORED_DATA_KEYS if k in settings}
    where = "data settings"
    dataset = out.get("dataset")
    if not isinstance(dataset, str) or dataset not in dataset_names():
        raise _damaged(path, f"{where}: dataset is {_short(dataset)}, expected one of "
                             f"{', '.join(dataset_names())}")
    root = out.get("root")
    if root is not None and (not isinstance(root, str) or len(root) > 4096 or "\0" in root):
        raise _damaged(path, f"{where}: root is {_short(root)}, expected a path")
    fraction = out.get("val_fraction")
    if fraction is not None and (isinstance(fraction, bool) or not isinstance(fraction, int | float)
                                 or not 0 <= fraction < 1):
        raise _damaged(path, f"{where}: val_fraction is {_short(fraction)}, expected a number "
                             "in [0, 1)")
    for key in ("split_seed", "subset_seed"):
        value = out.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or not 0 <= value < 2**63):
            raise _damaged(path, f"{where}: {key} is {_short(value)}, expected an integer >= 0")
    per_class = out.get("train_per_class")
    if per_class is not None:
        _check_int(per_class, f"{where}.train_per_class", 10**9, path)
    for key in ("normalize_on_device", "skip_bad_images"):
        if key in out and not isinstance(out[key], bool):
            raise _damaged(path, f"{where}: {key} is {_short(out[key])}, expected true or false")
    if "decode_backend" in out and not isinstance(out["decode_backend"], str):
        raise _damaged(path, f"{where}: decode_backend is {_short(out['decode_backend'])}")
    _check_transform({k: out[k] for k in ("image_size", "resize_size", "mean", "std")
                      if out.get(k) is not None}, where, path)
    options = out.get("options")
    if options is not None:
        if not isinstance(options, dict) or not all(isinstance(k, str) for k in options):
            raise _damaged(path, f"{where}: options is {_short(options)}, expected a mapping of "
                                 "option names to values")
        if dataset == "synthetic":
            try:
                check_synthetic_options(options)
            except ValueError as err:
                raise _damaged(path, f"{where}: {str(err).split('; change')[0]}") from None
    return out


def validate_metadata(ckpt: dict[str, Any], path: str | Path) -> None:
    """Check the types and ranges of a crasmra checkpoint's metadata before anything is built.

    Every number that sizes a network or an image (classes, head widths, crop and resize
    sizes) must be an integer within generous limits, so that a damaged or hostile file is
    refused with a message instead of ending in an allocator error or a traceback. Files
    without a ``"crasmra"`` entry (plain weights) are left alone.

    Raises:
        CheckpointError: A value has the wrong type or an absurd size, or the format is newer
            than this crasmra.
    """
    if "crasmra" not in ckpt:
        return
    meta = ckpt["crasmra"]
    if not isinstance(meta, dict):
        raise _damaged(path, f"its 'crasmra' entry is {type(meta).__name__}, not a dictionary")
    version = meta.get("format_version", FORMAT_VERSION)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise _damaged(path, f"format_version is {_short(version)}, expected an integer >= 1")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} uses checkpoint format {version}, newer than this crasmra understands "
            f"({FORMAT_VERSION}); upgrade crasmra (written by crasmra "
            f"{_short(meta.get('version', '?'))})."
        )
    net_config = meta.get("net_config")
    if net_config is not None:
        if not isinstance(net_config, dict):
            raise _damaged(path, "'net_config' is not a dictionary")
        _check_network_numbers(net_config, "net_config", path)
    classes = meta.get("classes")
    if classes is not None and (not isinstance(classes, list | tuple)
                                or len(classes) > MAX_CLASSES
                                or not all(isinstance(c, str) for c in classes)):
        raise _damaged(path, "'classes' is not a list of names")
    _check_transform(meta.get("transform"), "transform", path)
    data_config = meta.get("data_config")
    if data_config is not None:
        if not isinstance(data_config, dict):
            raise _damaged(path, "'data_config' is not a dictionary")
        size = data_config.get("input_size")
        if size is not None:
            if not isinstance(size, list | tuple) or len(size) != 3:
                raise _damaged(path, f"data_config.input_size is {_short(size)}, expected "
                                     "[channels, height, width]")
            _check_size(list(size)[1:], "data_config.input_size", path)
    # Lightning rebuilds the training module from these (--ckpt_path), before any weights load.
    hparams = ckpt.get("hyper_parameters")
    if isinstance(hparams, dict):
        nested = isinstance(hparams.get("net"), dict)
        _check_network_numbers(network_hparams(hparams),
                               "hyper_parameters.net" if nested else "hyper_parameters", path)
        _check_transform(hparams.get("transform_config"), "hyper_parameters.transform_config",
                         path)
