"""Use a trained network: load a checkpoint, predict image files, evaluate a dataset split.

:func:`load_model` rebuilds the inference network (:class:`~crasmra.model.CRASMRANet`, no
SMRAM) from a checkpoint alone: the ``"crasmra"`` entry that every crasmra checkpoint and
safetensors export carries describes the architecture, the class names and the eval
transform. Files are read with ``torch.load(weights_only=True)`` or safetensors, never by
unpickling arbitrary objects (see :mod:`crasmra.checkpoint`).

Example::

    import crasmra
    from crasmra.data import load_image

    model = crasmra.load_model("runs/cub/checkpoints/best.ckpt")
    x = model.transform(load_image("bird.jpg")).unsqueeze(0)
    probs = model(x).probs                       # (1, K): mean of the four heads' softmaxes
    print(model.classes[int(probs.argmax())])

This module logs through :mod:`logging`; printing and progress bars belong to the CLI.
"""

from __future__ import annotations

import glob
import json
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from crasmra._version import __version__
from crasmra.checkpoint import (
    CheckpointError,
    build_metadata,
    check_data_settings,
    checkpoint_metadata,
    load_checkpoint_file,
    network_state_dict,
    smram_state_dict,
)
from crasmra.config import load_yaml
from crasmra.cpu import ComputePlan, cpu_autocast, plan_compute
from crasmra.data import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    ImageLoadError,
    Preprocessing,
    create_dataset,
    load_image,
)
from crasmra.data.errors import DatasetRootError
from crasmra.data.generic import IMAGE_EXTENSIONS, walk
from crasmra.errors import printable
from crasmra.files import write_text
from crasmra.layers import SMRAM
from crasmra.metrics import calibration, confusion_matrix, top_k_accuracy
from crasmra.model import CRASMRANet, create_smram
from crasmra.outputs import ModelOutput

__all__ = [
    "COMBINED",
    "EvalOutputs",
    "Failure",
    "Prediction",
    "PredictionResult",
    "build_eval_dataset",
    "check_report_size",
    "compute_report",
    "evaluate",
    "expected_calibration_error",
    "find_images",
    "load_model",
    "load_smram",
    "model_metadata",
    "predict",
    "resolve_device",
    "run_dataset_config",
    "write_report",
]

log = logging.getLogger(__name__)

#: Name of the paper's test-time prediction (mean of every head's softmax) in reports.
COMBINED = "combined"
#: Keys of a data-module configuration that select the evaluated images (the rest, such as
#: batch size or workers, only affect loading speed).
DATA_KEYS = ("dataset", "root", "val_fraction", "split_seed", "options")

ProgressFn = Callable[[int, int], None]


# ---------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------
def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None`` or ``"auto"``: the first CUDA GPU when there is one, else the CPU.

    Raises:
        ValueError: The device is unknown or not available on this machine (checked here, so
            that a command fails before it loads anything rather than deep inside ``.to()``).
    """
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as err:
        raise ValueError(
            f"Unknown device {device!r} ({err}); use cpu, cuda, cuda:1, mps or auto."
        ) from err
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"Device {device!r}: there is no CUDA device here (or PyTorch was "
                             "installed without CUDA support); use --device cpu, or auto.")
        if resolved.index is not None and resolved.index >= count:
            raise ValueError(f"Device {device!r}: this machine has {count} CUDA device(s), "
                             f"cuda:0..cuda:{count - 1}; choose one of those, or auto.")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"Device {device!r}: Apple's MPS is not available here; use --device "
                         "cpu, or auto.")
    return resolved


def cpu_compute_plan(model: CRASMRANet) -> ComputePlan | None:
    """The memory format and precision chosen for ``model``'s backbone on this CPU (the same
    choice as training's, :func:`crasmra.cpu.plan_compute`); None when it runs elsewhere."""
    param = next(model.parameters(), None)
    if param is None or param.device.type != "cpu":
        return None
    return plan_compute(str(model.config.get("backbone", "")))


def run_network(model: CRASMRANet, images: Tensor) -> ModelOutput:
    """``model(images)`` on the model's device, in the memory format and precision of
    :func:`cpu_compute_plan` on a CPU. Call it under ``torch.inference_mode()``."""
    images = images.to(next(model.parameters()).device)
    plan = cpu_compute_plan(model)
    if plan is not None and plan.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    with cpu_autocast(plan is not None and plan.bf16):
        return model(images)


def _check_classes(meta: dict[str, Any], num_classes: int, path: str | Path) -> list[str]:
    classes = meta.get("classes")
    if classes is None:
        log.warning("%s records no class names; using class_0..class_%d", path, num_classes - 1)
        return [f"class_{i}" for i in range(num_classes)]
    if not isinstance(classes, list | tuple) or not all(isinstance(c, str) for c in classes):
        raise CheckpointError(f"{path} has damaged metadata: 'classes' is not a list of names.")
    if len(classes) != num_classes:
        raise CheckpointError(
            f"{path} is inconsistent: its network has {num_classes} classes but it lists "
            f"{len(classes)} class names. The file was edited or assembled from two runs; use "
            "the checkpoint as `crasmra fit` wrote it."
        )
    return list(classes)


def _preprocessing(meta: dict[str, Any], path: str | Path) -> Preprocessing:
    config = meta.get("transform")
    if config is None:
        # Checkpoints written without a data module (e.g. a bare LightningModule) record only
        # timm's preprocessing config; fall back to the paper's resize/crop ratio at its size.
        data_config = meta.get("data_config") or {}
        size = list(data_config.get("input_size", (3, 448, 448)))[1:]
        config = {
            "image_size": size,
            "resize_size": None,
            "mean": list(data_config.get("mean", IMAGENET_DEFAULT_MEAN)),
            "std": list(data_config.get("std", IMAGENET_DEFAULT_STD)),
        }
        log.warning("%s records no eval transform; using resize + centre crop to %s", path, size)
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} has damaged metadata: 'transform' is not a dictionary.")
    try:
        preprocessing = Preprocessing.from_config(config)
        preprocessing.transform()  # a malformed config fails here, not at the first image
        return preprocessing
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path} has an unusable eval transform {config}: {err}") from err


def _check_state(net: CRASMRANet, state: dict[str, Tensor], path: str | Path) -> None:
    expected = net.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not match the network its metadata describes "
            f"({net.config['backbone']}, variant={net.variant}): {len(missing)} missing "
            f"weights (first: {missing[:3]}), {len(unexpected)} unexpected (first: "
            f"{unexpected[:3]}). The file was altered, or written by an incompatible crasmra."
        )
    wrong = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in expected.items()
             if state[k].shape != v.shape]
    if wrong:
        # The final layer of one head: its first dimension is the number of classes.
        last = (net.concat_head.mlp[-1].weight if net.concat_head is not None
                else net.backbone.model.get_classifier().weight)
        head_key = next(name for name, p in net.named_parameters() if p is last)
        if head_key in state and state[head_key].shape[0] != net.num_classes:
            raise CheckpointError(
                f"{path} holds classifier weights for {state[head_key].shape[0]} classes but its "
                f"metadata says {net.num_classes}; the file was altered. Use the checkpoint as "
                "`crasmra fit` wrote it."
            )
        key, got, want = wrong[0]
        raise CheckpointError(
            f"{path} has {len(wrong)} weight(s) of the wrong shape (first: {key} is {got}, the "
            f"network needs {want}); the file was altered or does not belong to this metadata."
        )
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(
            f"{path} has non-finite values (NaN/Inf) in {len(bad)} weight(s) (first: {bad[0]}). "
            "Training diverged before this checkpoint was saved, or the file is damaged; use an "
            "earlier checkpoint."
        )


def load_model(
    path: str | Path,
    *,
    device: str | torch.device | None = "cpu",
    num_classes: int | None = None,
) -> CRASMRANet:
    """Rebuild the inference network of a crasmra checkpoint, in eval mode.

    Accepts a training checkpoint from ``crasmra fit``/``crasmra demo`` (``.ckpt``) or a
    safetensors export from ``crasmra export``. SMRAM is training-only and never loaded.

    The returned object is the plain :class:`~crasmra.model.CRASMRANet` (so ``model(x).probs``
    and ``model(x).stage_logits`` work as in training) with its inference attributes set:

    - ``classes``: class names in label order.
    - ``preprocessing``: a :class:`~crasmra.data.Preprocessing` (sizes, mean, std).
    - ``transform``: its eval transform, PIL RGB image -> normalised ``(3, H, W)`` tensor.
    - ``checkpoint_path``: the file it was loaded from.

    Args:
        path: Checkpoint or ``.safetensors`` file.
        device: Where to put the network (``"auto"``: a GPU if there is one).
        num_classes: When given, the number of classes the caller expects (e.g. a dataset's);
            a checkpoint for another number is refused with a clear message.

    Returns:
        The network in eval mode.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: The file is truncated, corrupt, tampered with, not from crasmra, from
            an incompatible crasmra, or for another number of classes than ``num_classes``.
        ValueError: ``device`` is unknown or not available here.
    """
    device = resolve_device(device)
    ckpt = load_checkpoint_file(path)  # also checks the metadata's types and sizes
    meta = checkpoint_metadata(ckpt, path)
    net_config = {**meta["net_config"], "pretrained": False}
    # The network is first built on the meta device (no memory) and compared with the stored
    # weights: metadata describing a far larger network than the file holds is refused before
    # anything is allocated for it.
    skeleton = _build_network(net_config, meta, path, torch.device("meta"))
    if num_classes is not None and num_classes != skeleton.num_classes:
        raise CheckpointError(
            f"{path} was trained for {skeleton.num_classes} classes, but {num_classes} are "
            "expected here (e.g. by the dataset). Use a checkpoint trained on this data, or "
            "fine-tune this one with `crasmra fit --model.init_from CKPT --model.reinit_heads "
            "true`."
        )
    classes = _check_classes(meta, skeleton.num_classes, path)
    preprocessing = _preprocessing(meta, path)
    state = network_state_dict(ckpt, path)
    _check_state(skeleton, state, path)
    net = _build_network(net_config, meta, path, torch.device("cpu"))
    net.load_state_dict(state)
    net.eval()
    net.to(device)
    plan = cpu_compute_plan(net)
    if plan is not None and plan.channels_last:
        net.to(memory_format=torch.channels_last)
    net.set_inference_info(classes, preprocessing, checkpoint_path=str(path))
    return net


def _build_network(
    net_config: dict[str, Any], meta: dict[str, Any], path: str | Path, device: torch.device
) -> CRASMRANet:
    try:
        with device:
            return CRASMRANet(**net_config)
    except (TypeError, ValueError, KeyError) as err:
        raise CheckpointError(
            f"{path} describes a network this crasmra ({__version__}) cannot build ({err}); it "
            f"was written by crasmra {meta.get('version', '?')}. Install that version, or "
            "retrain."
        ) from err


def load_smram(path: str | Path, model: CRASMRANet) -> SMRAM:
    """SMRAM with the weights of a ``cra-smra`` training checkpoint, in eval mode.

    For ``crasmra cam --train-maps``: SMRAM is not part of the inference network, so its
    weights exist only in training checkpoints.

    Raises:
        CheckpointError: The file has no SMRAM weights or they do not fit ``model``.
    """
    ckpt = load_checkpoint_file(path)
    state = smram_state_dict(ckpt, path)
    smram = create_smram(model)
    try:
        smram.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(f"{path}: its SMRAM weights do not fit the network ({err}).") from err
    device = next(model.parameters()).device
    return smram.to(device).eval()


def model_metadata(model: CRASMRANet) -> dict[str, Any]:
    """The ``"crasmra"`` checkpoint entry that describes a loaded model (for exports)."""
    preprocessing = model.preprocessing
    return build_metadata(model.config, model.classes,
                          preprocessing.as_config() if preprocessing else None, model.data_config)


# ---------------------------------------------------------------------------------------------
# predicting image files
# ---------------------------------------------------------------------------------------------
@dataclass
class Failure:
    """An input that could not be used, and why."""

    path: str
    reason: str


@dataclass
class Prediction:
    """Top-k classes of one image (combined prediction), most probable first."""

    path: str
    indices: list[int]
    labels: list[str]
    probabilities: list[float]

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form: ``{"path", "top_k": [{"rank", "index", "label", "probability"}]}``."""
        return {
            "path": self.path,
            "top_k": [
                {"rank": r + 1, "index": i, "label": lab, "probability": p}
                for r, (i, lab, p) in enumerate(
                    zip(self.indices, self.labels, self.probabilities, strict=True))
            ],
        }


@dataclass
class PredictionResult:
    """What :func:`predict` returns: predictions in input order, and the skipped inputs."""

    predictions: list[Prediction] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)


def _has_glob_magic(text: str) -> bool:
    return any(ch in text for ch in "*?[")


def _images_in(folder: Path) -> list[Path]:
    """Image files under ``folder``, hidden entries left out; iterative and depth-limited
    (:func:`crasmra.data.generic.walk`), so a deep folder cannot end in RecursionError. Links
    to folders are not followed (a link loop or a link to ``/`` would walk without end)."""
    found = []
    for dirpath, dirnames, filenames in walk(folder, follow_links=False):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found.extend(Path(dirpath) / f for f in filenames
                     if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_EXTENSIONS
                     and (Path(dirpath) / f).is_file())
    return sorted(found)


def find_images(inputs: Iterable[str | Path]) -> tuple[list[Path], list[Failure]]:
    """Expand files, folders (recursively, image extensions only) and glob patterns.

    A file named explicitly is kept whatever its extension. Duplicates are dropped, the
    order of ``inputs`` is kept and folders and globs are sorted.

    Returns:
        The image files, and a :class:`Failure` for every input that matched nothing.
    """
    files: list[Path] = []
    failures: list[Failure] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            try:
                found = _images_in(path)
            except DatasetRootError as err:
                failures.append(Failure(str(item), str(err)))
                continue
            if not found:
                failures.append(Failure(str(item), "folder holds no image files"))
            files.extend(found)
        elif path.exists():
            files.append(path)
        elif _has_glob_magic(str(item)):
            try:
                matches = sorted(Path(m) for m in glob.glob(str(path), recursive=True))
                found = [f for m in matches for f in (_images_in(m) if m.is_dir() else [m])]
            except (DatasetRootError, RecursionError) as err:
                reason = (str(err) if isinstance(err, DatasetRootError)
                          else "the pattern reaches folders nested too deeply")
                failures.append(Failure(str(item), reason))
                continue
            if not found:
                failures.append(Failure(str(item), "no file matches this pattern"))
            files.extend(found)
        else:
            failures.append(Failure(str(item), "no such file or folder"))
    unique = list(dict.fromkeys(files))
    return unique, failures


class _ImageFiles(Dataset):
    """Image files -> ``(tensor or None, index, error)``; errors travel instead of raising."""

    def __init__(self, files: Sequence[Path], transform: Callable) -> None:
        self.files = list(files)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Tensor | None, int, str | None]:
        try:
            image = load_image(self.files[index])
        except ImageLoadError as err:
            return None, index, err.reason
        try:
            return self.transform(image), index, None
        except (OSError, ValueError, RuntimeError) as err:
            # A decodable but unusable image (e.g. a degenerate size) is one bad file too.
            return None, index, f"cannot be transformed ({err})"


def _collate_good(items: list[tuple[Tensor | None, int, str | None]]) -> dict[str, Any]:
    good = [(x, i) for x, i, _ in items if x is not None]
    return {
        "images": torch.stack([x for x, _ in good]) if good else None,
        "indices": [i for _, i in good],
        "errors": [(i, e) for x, i, e in items if x is None],
    }


def _loader(dataset: Dataset, batch_size: int, num_workers: int, collate: Callable) -> DataLoader:
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}.")
    if num_workers < 0:
        raise ValueError(f"number of workers must be >= 0, got {num_workers}.")
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      collate_fn=collate)


def predict(
    model: CRASMRANet,
    inputs: Iterable[str | Path],
    *,
    top_k: int = 5,
    batch_size: int = 32,
    num_workers: int = 0,
    progress: ProgressFn | None = None,
) -> PredictionResult:
    """Classify image files with the combined prediction (mean of the heads' softmaxes).

    Unreadable files and inputs that match nothing are reported in ``failures`` (and
    logged) and skipped; they never stop the batch.

    Args:
        model: A network from :func:`load_model` (uses its ``transform`` and ``classes``).
        inputs: Files, folders and glob patterns (see :func:`find_images`).
        top_k: Classes per image (capped at the number of classes).
        batch_size: Images per forward pass.
        num_workers: DataLoader processes decoding images (0: in this process).
        progress: Called as ``progress(files_done, files_total)`` after every batch.

    Returns:
        Predictions in input order and the failures.
    """
    if top_k < 1:
        raise ValueError(f"top-k must be >= 1, got {top_k}.")
    files, failures = find_images(inputs)
    result = PredictionResult(failures=list(failures))
    k = min(top_k, model.num_classes)
    loader = _loader(_ImageFiles(files, model.transform), batch_size, num_workers, _collate_good)
    by_index: dict[int, Prediction] = {}
    done = 0
    model.eval()
    for batch in loader:
        for index, reason in batch["errors"]:
            log.debug("Skipping %s: %s", files[index], reason)
            result.failures.append(Failure(str(files[index]), reason))
        if batch["images"] is not None:
            with torch.inference_mode():
                probs = run_network(model, batch["images"]).probs
            values, indices = probs.topk(k, dim=1)
            for row, index in enumerate(batch["indices"]):
                idx = indices[row].tolist()
                by_index[index] = Prediction(
                    path=str(files[index]),
                    indices=idx,
                    labels=[model.classes[i] for i in idx],
                    probabilities=[float(p) for p in values[row]],
                )
        done += len(batch["indices"]) + len(batch["errors"])
        if progress is not None:
            progress(done, len(files))
    result.predictions = [by_index[i] for i in sorted(by_index)]
    return result


# ---------------------------------------------------------------------------------------------
# evaluating a dataset split
# ---------------------------------------------------------------------------------------------
def run_dataset_config(checkpoint_path: str | Path) -> dict[str, Any] | None:
    """The data settings a checkpoint was trained with, if they can be found.

    Looks first in the checkpoint (Lightning stores the data module's hyperparameters under
    ``datamodule_hyper_parameters``), then in the run folder's resolved ``config.yaml``
    (``<run>/checkpoints/best.ckpt`` -> ``<run>/config.yaml``).

    Returns:
        ``{"dataset", "root", "val_fraction", "split_seed", "options"}`` (those present),
        or None when neither source has them.

    Raises:
        FileNotFoundError, CheckpointError: The checkpoint is missing or cannot be read.
    """
    path = Path(checkpoint_path)
    source: dict[str, Any] | None = None
    origin: Path = path
    if path.suffix != ".safetensors":
        # A file that cannot be read is reported as such: "records no dataset" would send the
        # user looking for the wrong problem.
        ckpt = load_checkpoint_file(path)
        hp = ckpt.get("datamodule_hyper_parameters")
        if isinstance(hp, dict) and "dataset" in hp:
            source = dict(hp)
    config_file = path.resolve().parent.parent / "config.yaml"
    if source is None and config_file.is_file():
        import yaml

        try:
            config = load_yaml(config_file.read_text(), str(config_file))
        except yaml.YAMLError as err:
            log.warning("Cannot read %s: %s", config_file, err)
            config = None
        data = config.get("data") if isinstance(config, dict) else None
        if isinstance(data, dict) and "dataset" in data:
            source, origin = data, config_file
    if source is None:
        return None
    # Settings from a file are input like any other: checked as the command line checks them.
    checked = check_data_settings(source, origin)
    return {k: checked[k] for k in DATA_KEYS if checked.get(k) is not None}


def build_eval_dataset(
    model: CRASMRANet, data: dict[str, Any], split: str = "test"
) -> Dataset:
    """One split of a dataset, transformed with the model's own eval transform.

    Args:
        model: A network from :func:`load_model`.
        data: ``{"dataset": name, "root": ..., "val_fraction": ..., "split_seed": ...,
            "options": {...}}``, e.g. from :func:`run_dataset_config`.
        split: "train", "val" or "test".
    """
    if "dataset" not in data:
        raise ValueError("No dataset given: pass --data NAME (and --root PATH).")
    options = dict(data.get("options") or {})
    kwargs = {k: data[k] for k in ("val_fraction", "split_seed") if k in data}
    # Bad images are reported by evaluate() and left out, not replaced by a neighbour (which
    # would count that neighbour twice).
    return create_dataset(data["dataset"], data.get("root"), split, transform=model.transform,
                          skip_bad_images=False, **kwargs, **options)


class _SafeItems(Dataset):
    """Dataset items as ``(image, label, index, error)``, with load errors carried, not raised."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Tensor | None, int, int, str | None]:
        try:
            image, label = self.dataset[index]
        except ImageLoadError as err:
            return None, -1, index, f"{err.path}: {err.reason}"
        return image, int(label), index, None


def _collate_labelled(items: list[tuple[Tensor | None, int, int, str | None]]) -> dict[str, Any]:
    good = [(x, y) for x, y, _, _ in items if x is not None]
    return {
        "images": torch.stack([x for x, _ in good]) if good else None,
        "targets": torch.tensor([y for _, y in good], dtype=torch.long),
        "errors": [e for x, _, _, e in items if x is None],
    }


@dataclass
class EvalOutputs:
    """Per-head probabilities and the labels of an evaluated split.

    Attributes:
        head_names: The network's heads (stage heads and ``"concat"``, or plain's
            ``"classifier"``), then :data:`COMBINED`.
        probs: ``{head: (N, K) float32 probabilities}``.
        targets: (N,) labels.
        skipped: ``"path: reason"`` of every image left out because it could not be read.
    """

    head_names: tuple[str, ...]
    probs: dict[str, Tensor]
    targets: Tensor
    skipped: list[str] = field(default_factory=list)


@torch.inference_mode()
def evaluate(
    model: CRASMRANet,
    dataset: Dataset,
    *,
    batch_size: int = 32,
    num_workers: int = 0,
    progress: ProgressFn | None = None,
) -> EvalOutputs:
    """Run the network over a labelled dataset and collect every head's probabilities.

    Unreadable images are left out and listed in ``skipped``.
    """
    heads = (*model.head_names, COMBINED)
    chunks: dict[str, list[Tensor]] = {h: [] for h in heads}
    targets: list[Tensor] = []
    skipped: list[str] = []
    total, done = len(dataset), 0  # type: ignore[arg-type]
    model.eval()
    for batch in _loader(_SafeItems(dataset), batch_size, num_workers, _collate_labelled):
        for error in batch["errors"]:
            log.debug("Skipping unreadable image %s", error)
        skipped.extend(batch["errors"])
        if batch["images"] is not None:
            out = run_network(model, batch["images"])
            for name, logits in zip(heads[:-1], out.logits, strict=True):
                chunks[name].append(logits.float().softmax(dim=1).cpu())
            chunks[COMBINED].append(out.probs.float().cpu())
            targets.append(batch["targets"])
        done += len(batch["targets"]) + len(batch["errors"])
        if progress is not None:
            progress(done, total)
    if not targets:
        raise ValueError(f"No image of the dataset could be read ({len(skipped)} skipped).")
    return EvalOutputs(
        head_names=heads,
        probs={h: torch.cat(c) for h, c in chunks.items()},
        targets=torch.cat(targets),
        skipped=skipped,
    )


#: The most classes ``crasmra report`` takes: it writes the K x K confusion matrix into
#: ``report.json`` and draws it, which for K = 1,000 is a million cells (8 MB in memory,
#: about 10 MB of JSON) and beyond that unreadable anyway. ``crasmra test`` has no such limit.
MAX_REPORT_CLASSES = 1_000
#: The most memory the per-head probabilities of a report may take (images x classes x
#: (heads + combined) x 4 bytes), checked before any image is read.
MAX_REPORT_BYTES = 2 * 2**30


def check_report_size(num_images: int, num_classes: int, num_heads: int) -> None:
    """Refuse a report whose confusion matrix or probabilities would be too large, before
    anything is allocated for them (see :data:`MAX_REPORT_CLASSES`, :data:`MAX_REPORT_BYTES`).

    Raises:
        CheckpointError: More than :data:`MAX_REPORT_CLASSES` classes (the checkpoint sets it).
        ValueError: The split's probabilities would take more than :data:`MAX_REPORT_BYTES`.
    """
    if num_classes > MAX_REPORT_CLASSES:
        raise CheckpointError(
            f"crasmra report handles at most {MAX_REPORT_CLASSES:,} classes (it writes and "
            f"draws the K x K confusion matrix); this model has {num_classes:,}. Use `crasmra "
            "test --ckpt_path CHECKPOINT` for its accuracies."
        )
    needed = num_images * num_classes * (num_heads + 1) * 4 + num_classes**2 * 8
    if needed > MAX_REPORT_BYTES:
        raise ValueError(
            f"A report of {num_images:,} images x {num_classes:,} classes would hold "
            f"{needed / 2**30:.1f} GiB of probabilities, more than crasmra report's "
            f"{MAX_REPORT_BYTES / 2**30:.0f} GiB; evaluate a smaller split, or use `crasmra "
            "test --ckpt_path CHECKPOINT`, which keeps no per-image probabilities."
        )


def expected_calibration_error(
    probs: Tensor | np.ndarray, targets: Tensor | np.ndarray, n_bins: int = 15
) -> dict[str, Any]:
    """Expected calibration error of the top-1 confidence, with equal-width bins.

    ``ECE = sum_b (n_b / N) * |accuracy_b - confidence_b|`` over ``n_bins`` bins of (0, 1],
    computed by torchmetrics' ``MulticlassCalibrationError(norm="l1")``, with each bin's
    figures for the reliability diagram.

    Returns:
        ``{"ece", "n_bins", "bins": [{"lower", "upper", "count", "accuracy", "confidence"}]}``;
        empty bins have ``accuracy`` and ``confidence`` None.
    """
    if n_bins < 1:
        raise ValueError(f"the number of calibration bins must be >= 1, got {n_bins}.")
    return calibration(torch.as_tensor(probs), torch.as_tensor(targets), n_bins)


def compute_report(
    outputs: EvalOutputs,
    classes: Sequence[str],
    *,
    n_bins: int = 15,
    top_confused: int = 10,
) -> dict[str, Any]:
    """Accuracy of every head, per-class accuracy, confused pairs and calibration.

    Per-class accuracy, the confusion matrix, confused pairs and calibration are those of the
    combined prediction. Top-5 is None for fewer than five classes (undefined, as in training).

    Returns:
        A JSON-ready dictionary (see ``report.json``).
    """
    num_classes = len(classes)
    targets = outputs.targets
    heads = {}
    for name in outputs.head_names:
        p = outputs.probs[name]
        heads[name] = {
            "top1": top_k_accuracy(p, targets, 1),
            "top5": top_k_accuracy(p, targets, 5) if num_classes >= 5 else None,
        }
    confusion = confusion_matrix(outputs.probs[COMBINED], targets)  # (K, K), rows: true class
    support = confusion.sum(dim=1)
    per_class = [
        {
            "index": i,
            "label": classes[i],
            "support": int(support[i]),
            "correct": int(confusion[i, i]),
            "accuracy": float(confusion[i, i] / support[i]) if support[i] else None,
        }
        for i in range(num_classes)
    ]
    off = confusion.clone()
    off.fill_diagonal_(0)
    order = torch.argsort(off.flatten(), descending=True, stable=True)
    pairs = []
    for flat in order[:top_confused].tolist():
        true, pred = divmod(flat, num_classes)
        count = int(off[true, pred])
        if count == 0:
            break
        pairs.append({
            "true": classes[true], "predicted": classes[pred],
            "true_index": true, "predicted_index": pred,
            "count": count, "rate": count / int(support[true]),
        })
    return {
        "num_images": len(targets),
        "num_skipped": len(outputs.skipped),
        "skipped": list(outputs.skipped),
        "num_classes": num_classes,
        "heads": heads,
        "per_class": per_class,
        "confused_pairs": pairs,
        "calibration": expected_calibration_error(outputs.probs[COMBINED], targets, n_bins),
        "confusion_matrix": confusion.tolist(),
    }


def _pct(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    return f"{100 * value:.2f}%"


#: Characters Markdown gives a meaning to, escaped with a backslash in report.md (CommonMark
#: lets any ASCII punctuation be escaped): a class name must not become a link, an image, a
#: table column, emphasis or raw HTML such as <script>.
_MD_SPECIAL = set("\\`*_{}[]()#+!|<>~")


def _md_cell(text: object) -> str:
    """``text`` as literal Markdown: control characters escaped as ``predict`` prints them
    (ESC, BEL, CR, newline), Markdown punctuation backslash-escaped and ``&`` as ``&amp;``."""
    return "".join("&amp;" if ch == "&" else f"\\{ch}" if ch in _MD_SPECIAL else ch
                   for ch in printable(text))


def write_report(
    report: dict[str, Any],
    out_dir: str | Path,
    *,
    context: dict[str, Any] | None = None,
    figures: dict[str, str] | None = None,
) -> tuple[Path, Path]:
    """Write ``report.md`` (for people) and ``report.json`` (for programs) into ``out_dir``.

    Args:
        report: From :func:`compute_report`.
        out_dir: Output folder (created).
        context: Shown at the top and stored under ``"context"`` (checkpoint, dataset, split).
        figures: ``{title: file name in out_dir}`` of PNGs to embed in ``report.md``.

    Returns:
        The paths of ``report.md`` and ``report.json``, each written atomically.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    context = dict(context or {})
    figures = dict(figures or {})
    json_path = out / "report.json"
    write_text(json_path, json.dumps({"context": context, **report,
                                      "figures": figures}, indent=2) + "\n")

    lines = ["# crasmra evaluation report", ""]
    lines += [f"- {k}: {_md_cell(v)}" for k, v in context.items() if v is not None]
    lines += [f"- images evaluated: {report['num_images']} ({report['num_skipped']} unreadable, "
              "skipped)", f"- classes: {report['num_classes']}", ""]
    lines += ["## Accuracy by head", "",
              "The combined prediction is the mean of the heads' softmaxes (the paper's "
              "test-time rule; for the plain variant, its one classifier's softmax).", "",
              "| head | top-1 | top-5 |", "| --- | ---: | ---: |"]
    lines += [f"| {name} | {_pct(v['top1'])} | {_pct(v['top5'])} |"
              for name, v in report["heads"].items()]
    cal = report["calibration"]
    lines += ["", "## Calibration (combined)", "",
              f"Expected calibration error: **{100 * cal['ece']:.2f}%** ({cal['n_bins']} "
              "equal-width confidence bins).", ""]
    lines += ["## Most confused pairs (combined)", ""]
    if report["confused_pairs"]:
        lines += ["| true class | predicted as | images | share of the true class |",
                  "| --- | --- | ---: | ---: |"]
        lines += [f"| {_md_cell(p['true'])} | {_md_cell(p['predicted'])} | {p['count']} | "
                  f"{_pct(p['rate'])} |" for p in report["confused_pairs"]]
    else:
        lines.append("No image was misclassified.")
    lines += ["", "## Per-class accuracy (combined)", "",
              "| # | class | images | correct | accuracy |", "| ---: | --- | ---: | ---: | ---: |"]
    lines += [f"| {c['index']} | {_md_cell(c['label'])} | {c['support']} | {c['correct']} | "
              f"{_pct(c['accuracy'])} |" for c in report["per_class"]]
    if figures:
        lines += ["", "## Figures", ""]
        lines += [f"![{title}]({name})" for title, name in figures.items()]
    if report["skipped"]:
        lines += ["", "## Unreadable images (skipped)", ""]
        lines += [f"- {_md_cell(s)}" for s in report["skipped"]]
    md_path = out / "report.md"
    write_text(md_path, "\n".join(lines) + "\n")
    return md_path, json_path
