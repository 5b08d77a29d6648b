"""The export formats and their defaults, importable without torch (for ``--help``)."""

from __future__ import annotations

__all__ = ["DEFAULT_OPSET", "DEFAULT_TOLERANCE", "EXPORT_FORMATS"]

EXPORT_FORMATS: tuple[str, ...] = ("onnx", "torchscript", "safetensors")
#: Largest absolute difference between the export and the eager network that passes.
DEFAULT_TOLERANCE = 1e-4
#: ONNX opset: 17 is read by every onnxruntime since 1.13 and by TensorRT 8.6+.
DEFAULT_OPSET = 17
