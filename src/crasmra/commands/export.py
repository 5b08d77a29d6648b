"""``crasmra export CKPT --format onnx|torchscript|safetensors --out FILE``."""

from __future__ import annotations

import argparse
from typing import Any

from crasmra.export_options import DEFAULT_OPSET, DEFAULT_TOLERANCE, EXPORT_FORMATS

USAGE = "crasmra export CHECKPOINT --format FORMAT --out FILE"


def register(subparsers: Any) -> None:
    """Add the ``export`` subcommand."""
    p = subparsers.add_parser(
        "export",
        help="export the inference network (ONNX, TorchScript, safetensors) with a parity check",
        description="Export the inference network (no SMRAM, eval mode, dynamic batch size). "
        "The exported model takes a normalised image batch and returns the combined "
        "probabilities. The export is checked against the eager network on random inputs and "
        "refused when the largest absolute difference exceeds the tolerance.",
    )
    p.add_argument("checkpoint", help="checkpoint (.ckpt) or .safetensors export")
    p.add_argument("--format", required=True, choices=EXPORT_FORMATS, help="export format")
    p.add_argument("--out", required=True, help="output file")
    p.add_argument("--head-logits", action="store_true",
                   help="also output every head's logits (onnx, torchscript)")
    p.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                   help=f"largest allowed absolute difference (default: {DEFAULT_TOLERANCE:g})")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                   help=f"ONNX opset version (default: {DEFAULT_OPSET}; the range depends on "
                   "the installed torch)")
    p.set_defaults(func=run)


def run(ns: argparse.Namespace) -> int:
    """Handler of ``crasmra export``."""
    from crasmra.checkpoint import check_checkpoint_argument
    from crasmra.export import check_export_arguments, export_model
    from crasmra.files import check_writable
    from crasmra.inference import load_model

    # Arguments and the output are checked before the model is loaded.
    check_checkpoint_argument(ns.checkpoint, USAGE)
    check_export_arguments(ns.format, ns.out, tolerance=ns.tolerance, opset=ns.opset,
                           inputs=[ns.checkpoint])
    check_writable(ns.out, "--out")
    model = load_model(ns.checkpoint, device="cpu")
    # Without the export extra this raises MissingExtraError, printed as one line by main.
    result = export_model(model, ns.format, ns.out, head_logits=ns.head_logits,
                          tolerance=ns.tolerance, opset=ns.opset)
    batches = " and ".join(str(b) for b in result.batch_sizes)
    shape = ", ".join(map(str, result.input_shape))
    if result.format == "safetensors":
        print(f"Wrote {result.path} (inference weights + metadata, no SMRAM; load it with "
              "crasmra.load_model).")
    else:
        print(f"Wrote {result.path} ({result.format}; input 'images' (batch, {shape}), "
              f"normalised; outputs {', '.join(result.outputs)}).")
    print(f"Parity with the eager network on batches of {batches}: max |diff| "
          f"{result.max_abs_diff:.3g} (tolerance {result.tolerance:g}).")
    return 0
