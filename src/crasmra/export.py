"""Export the inference network to ONNX, TorchScript or safetensors, with a parity check.

The exported graph is the inference network only (no SMRAM), in eval mode, with a dynamic
batch size. It takes a normalised image batch ``images`` (float32, ``(batch, 3, H, W)``,
prepared with the checkpoint's eval transform) and returns ``probs``, the paper's combined
prediction (the mean of the four heads' softmaxes; for the plain variant its classifier's
softmax); with ``head_logits=True`` it also returns ``logits_<head>`` for every head
(``logits_<stage>`` per stage head and ``logits_concat``, or ``logits_classifier``).

Every export is checked against the eager network on random inputs at two batch sizes
(onnxruntime runs the ONNX file; the TorchScript file and the safetensors file are loaded
back): when the largest absolute difference of any output exceeds the tolerance (1e-4), a
:class:`ExportParityError` is raised and no file is left at the output path. The file is
written under a temporary name and renamed into place only after the check passes.

The exported files carry the class names and the eval transform: ONNX in its metadata
properties, TorchScript in an extra file ``crasmra.json``, safetensors in its ``"crasmra"``
metadata entry (so ``crasmra.load_model`` reads it like a checkpoint).

onnx and onnxruntime are optional (``pip install "crasmra[export]"``) and imported only here.
"""

from __future__ import annotations

import json
import logging
import math
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from crasmra.checkpoint import (
    TORCHSCRIPT_META,
    build_metadata,
    checkpoint_metadata,
    load_checkpoint_file,
    network_state_dict,
    save_safetensors,
)
from crasmra.errors import CrasmraError, MissingExtraError
from crasmra.export_options import DEFAULT_OPSET, DEFAULT_TOLERANCE, EXPORT_FORMATS
from crasmra.files import check_output
from crasmra.model import Network, build_network

__all__ = [
    "DEFAULT_TOLERANCE",
    "EXPORT_FORMATS",
    "ExportParityError",
    "ExportResult",
    "ExportWrapper",
    "export_model",
]

log = logging.getLogger(__name__)

#: Batch sizes of the parity check; neither is the traced batch size (2), which shows that the
#: batch dimension really is dynamic.
PARITY_BATCH_SIZES = (1, 3)
#: What an existing output file may be for each format: the same format's earlier export
#: (see crasmra.file_kinds.file_kind). ONNX files are no checkpoints, so any may be replaced.
REPLACEABLE = {"onnx": (), "torchscript": ("torchscript",), "safetensors": ("safetensors",)}


def onnx_opset_range() -> tuple[int, int]:
    """The ONNX opsets the installed TorchScript-based exporter writes, ``(lowest, highest)``.

    Above its highest, torch only warns and stamps a newer opset on an older graph.
    """
    try:
        from torch.onnx import _constants
    except ImportError:  # a private module; fall back to a range every torch 2.x exports
        return 7, 17
    high = getattr(_constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET",
                   getattr(_constants, "ONNX_MAX_OPSET", 17))
    return int(getattr(_constants, "ONNX_MIN_OPSET", 7)), int(high)


class ExportParityError(CrasmraError, RuntimeError):
    """The exported model's outputs differ from the eager network's by more than allowed."""

    exit_code = 1


class ExportWrapper(nn.Module):
    """The graph that is exported: images -> combined probabilities (+ per-head logits).

    Args:
        net: The inference network, in eval mode.
        head_logits: Also return every head's logits after the probabilities.
    """

    def __init__(self, net: Network, head_logits: bool = False) -> None:
        super().__init__()
        self.net = net
        self.head_logits = head_logits

    @property
    def output_names(self) -> list[str]:
        """``["probs"]``, then ``logits_<head>`` per head (``net.head_names``) with head logits."""
        names = ["probs"]
        if self.head_logits:
            names += [f"logits_{h}" for h in self.net.head_names]
        return names

    def forward(self, images: Tensor) -> Tensor | tuple[Tensor, ...]:
        out = self.net(images)
        if not self.head_logits:
            return out.probs
        return (out.probs, *out.logits)


@dataclass
class ExportResult:
    """What was exported and how closely it matches the eager network.

    Attributes:
        path: The file written.
        format: "onnx", "torchscript" or "safetensors".
        max_abs_diff: Largest absolute difference over every output and parity batch.
        diffs: Largest absolute difference per output name.
        tolerance: The threshold the check used.
        batch_sizes: Batch sizes the check ran.
        input_shape: ``(3, H, W)`` of the check's inputs (the eval transform's crop).
        outputs: Output names, in order.
    """

    path: Path
    format: str
    max_abs_diff: float
    diffs: dict[str, float]
    tolerance: float
    batch_sizes: tuple[int, ...]
    input_shape: tuple[int, int, int]
    outputs: list[str] = field(default_factory=list)


def _input_shape(model: Network) -> tuple[int, int, int]:
    return model.resolved_preprocessing().input_shape


def _as_tuple(outputs: Any) -> tuple[Tensor, ...]:
    return tuple(outputs) if isinstance(outputs, list | tuple) else (outputs,)


def _compare(
    names: Sequence[str],
    reference: Callable[[Tensor], Sequence[Tensor]],
    candidate: Callable[[Tensor], Sequence[np.ndarray | Tensor]],
    inputs: Sequence[Tensor],
) -> dict[str, float]:
    diffs = dict.fromkeys(names, 0.0)
    for x in inputs:
        want = reference(x)
        got = candidate(x)
        if len(got) != len(want):
            raise ExportParityError(f"The export returns {len(got)} outputs, expected {len(want)}.")
        for name, a, b in zip(names, want, got, strict=True):
            b = torch.as_tensor(np.asarray(b)) if not isinstance(b, Tensor) else b
            if tuple(b.shape) != tuple(a.shape):
                raise ExportParityError(
                    f"Output {name!r} of the export has shape {tuple(b.shape)} for a batch of "
                    f"{x.shape[0]}, the eager network {tuple(a.shape)}."
                )
            diff = float((a.detach().float() - b.detach().float().cpu()).abs().max())
            # A NaN anywhere must survive the max, so that the check fails on it.
            if math.isnan(diff) or math.isnan(diffs[name]):
                diffs[name] = float("nan")
            else:
                diffs[name] = max(diffs[name], diff)
    return diffs


def _temporary_path(out: Path) -> Path:
    return out.with_name(f".{out.stem}.partial{out.suffix}")


def _export_onnx(
    wrapper: ExportWrapper, example: Tensor, path: Path, meta: dict[str, Any], opset: int
) -> Callable[[Tensor], list[np.ndarray]]:
    try:
        import onnx
        import onnxruntime as ort
    except ImportError as err:
        raise MissingExtraError("ONNX export", "export", "onnx and onnxruntime") from err
    names = wrapper.output_names
    dynamic = {"images": {0: "batch"}, **{n: {0: "batch"} for n in names}}
    with warnings.catch_warnings():
        # The TorchScript-based exporter is used on purpose: the torch.export-based one needs
        # onnxscript, which is not a dependency. The parity check below validates the result.
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", message=".*feature will be removed.*")
        # Only the batch is dynamic: the traced image size (a ViT's patch grid, a Swin's
        # window masks) is meant to be a constant, and the parity check validates the graph.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        try:
            torch.onnx.export(
                wrapper, (example,), str(path), dynamo=False, input_names=["images"],
                output_names=names, dynamic_axes=dynamic, opset_version=opset,
                do_constant_folding=True,
            )
        except torch.onnx.errors.OnnxExporterError as err:
            # An opset the exporter knows can still lack an operation of this network.
            reason = (str(err).splitlines() or [type(err).__name__])[0]
            reason = reason.split(". Try ")[0].split(". Please ")[0].rstrip(".")
            raise ValueError(f"ONNX opset {opset} cannot express this network ({reason}); use "
                             f"a newer --opset (default {DEFAULT_OPSET}).") from err
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    onnx.helper.set_model_props(model, {
        "crasmra": json.dumps(meta),
        "classes": json.dumps(meta.get("classes")),
        "transform": json.dumps(meta.get("transform")),
        "outputs": json.dumps(names),
    })
    onnx.save(model, str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda x: session.run(names, {"images": x.numpy()})


def _export_torchscript(
    wrapper: ExportWrapper, example: Tensor, path: Path, meta: dict[str, Any]
) -> Callable[[Tensor], tuple[Tensor, ...]]:
    with warnings.catch_warnings():
        # torch.jit is deprecated upstream but still the format C++ (libtorch) deployments load.
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.\w+.* is deprecated.*")
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        # check_trace would rerun and compare the trace; the parity check does that at other
        # batch sizes, which also proves the batch dimension is not baked in.
        traced = torch.jit.trace(wrapper, (example,), check_trace=False)
        torch.jit.save(traced, str(path), _extra_files={TORCHSCRIPT_META: json.dumps(meta)})
        loaded = torch.jit.load(str(path), map_location="cpu")
    loaded.eval()

    def run(x: Tensor) -> tuple[Tensor, ...]:
        with torch.no_grad():
            return _as_tuple(loaded(x))

    return run


def _export_safetensors(
    wrapper: ExportWrapper, path: Path, meta: dict[str, Any]
) -> Callable[[Tensor], tuple[Tensor, ...]]:
    save_safetensors(path, wrapper.net.state_dict(), meta)
    # Rebuilt from the file alone, as crasmra.load_model does.
    stored = load_checkpoint_file(path)
    net = build_network(**checkpoint_metadata(stored, path)["net_config"])
    net.load_state_dict(network_state_dict(stored, path))
    reloaded = ExportWrapper(net.eval(), head_logits=wrapper.head_logits)

    def run(x: Tensor) -> tuple[Tensor, ...]:
        with torch.no_grad():
            return _as_tuple(reloaded(x))

    return run


def check_export_arguments(
    format: str,
    out: str | Path,
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    opset: int = DEFAULT_OPSET,
    inputs: Sequence[str | Path] = (),
) -> None:
    """Check an export's arguments and output file before anything is loaded or exported.

    Args:
        format: "onnx", "torchscript" or "safetensors".
        out: Output file.
        tolerance: Largest absolute difference that passes the parity check.
        opset: ONNX opset version (checked for "onnx" only).
        inputs: Files the export reads (its checkpoint), which ``out`` must not be.

    Raises:
        ValueError: Unknown format, bad output name, tolerance or opset.
        crasmra.errors.UsageError: ``out`` is an input or another checkpoint.
    """
    if format not in EXPORT_FORMATS:
        raise ValueError(f"Unknown export format {format!r}; choose one of {EXPORT_FORMATS}.")
    if not tolerance > 0:
        raise ValueError(f"The tolerance must be > 0, got {tolerance}.")
    if format == "onnx":
        low, high = onnx_opset_range()
        if not low <= opset <= high:
            raise ValueError(f"--opset {opset} is not supported: this torch exports ONNX opsets "
                             f"{low}..{high} (default {DEFAULT_OPSET}).")
    out = Path(out)
    if format == "safetensors" and out.suffix != ".safetensors":
        raise ValueError(f"Name the safetensors file *.safetensors (got {out.name}), so that "
                         "crasmra.load_model recognises it.")
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; give a file name.")
    check_output(out, "--out", inputs=inputs, replaceable=REPLACEABLE[format])


def export_model(
    model: Network,
    format: str,
    out: str | Path,
    *,
    head_logits: bool = False,
    tolerance: float = DEFAULT_TOLERANCE,
    opset: int = DEFAULT_OPSET,
    seed: int = 0,
) -> ExportResult:
    """Export the inference network and check it against the eager network.

    Args:
        model: A network from ``crasmra.load_model`` (any device; the export runs on the CPU).
        format: "onnx", "torchscript" or "safetensors".
        out: Output file; safetensors files must end in ``.safetensors``.
        head_logits: Also output every head's logits (not stored by safetensors, which holds
            weights only).
        tolerance: Largest absolute difference that passes the parity check.
        opset: ONNX opset version.
        seed: Seed of the random parity inputs.

    Returns:
        The file and the parity figures.

    Raises:
        ValueError: Unknown format, bad output name, tolerance or opset, or an opset too old
            for an operation of the network.
        crasmra.errors.UsageError: ``out`` is the model's own checkpoint or another checkpoint.
        ImportError: onnx / onnxruntime missing (with the install command).
        ExportParityError: The export disagrees with the eager network; nothing is written.
    """
    source = getattr(model, "checkpoint_path", None)
    check_export_arguments(format, out, tolerance=tolerance, opset=opset,
                           inputs=[source] if source else [])
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)

    source_device = next(model.parameters()).device
    net = model.to("cpu").eval()
    wrapper = ExportWrapper(net, head_logits=head_logits).eval()
    meta = {
        **build_metadata(net.config, net.classes,
                         net.resolved_preprocessing().as_config(), net.data_config),
        "outputs": wrapper.output_names,
    }
    shape = _input_shape(net)
    generator = torch.Generator().manual_seed(seed)
    example = torch.randn(2, *shape, generator=generator)
    inputs = [torch.randn(b, *shape, generator=generator) for b in PARITY_BATCH_SIZES]

    def reference(x: Tensor) -> tuple[Tensor, ...]:
        with torch.no_grad():
            return _as_tuple(wrapper(x))

    tmp = _temporary_path(out)
    try:
        if format == "onnx":
            candidate: Callable = _export_onnx(wrapper, example, tmp, meta, opset)
        elif format == "torchscript":
            candidate = _export_torchscript(wrapper, example, tmp, meta)
        else:
            candidate = _export_safetensors(wrapper, tmp, meta)
        diffs = _compare(wrapper.output_names, reference, candidate, inputs)
        worst = float("nan") if any(math.isnan(d) for d in diffs.values()) else max(diffs.values())
        if not worst <= tolerance:
            raise ExportParityError(
                f"The {format} export differs from the eager network by up to {worst:.3g} "
                f"(tolerance {tolerance:g}; per output: "
                + ", ".join(f"{k} {v:.3g}" for k, v in diffs.items())
                + f"). The export was not written to {out}."
            )
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
        model.to(source_device)
    log.debug("Exported %s (%s); max |diff| vs eager %.3g", out, format, worst)
    return ExportResult(path=out, format=format, max_abs_diff=worst, diffs=diffs,
                        tolerance=tolerance, batch_sizes=PARITY_BATCH_SIZES, input_shape=shape,
                        outputs=wrapper.output_names)
