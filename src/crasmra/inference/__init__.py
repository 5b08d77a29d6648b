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

The parts:

- :mod:`~crasmra.inference.device`: the device, and how the network runs on a CPU.
- :mod:`~crasmra.inference.loading`: :func:`load_model`, :func:`load_smram`.
- :mod:`~crasmra.inference.inputs`: files, folders and globs to images (:func:`find_images`).
- :mod:`~crasmra.inference.prediction`: :func:`predict`.
- :mod:`~crasmra.inference.evaluation`: a split's data settings and :func:`evaluate`.
- :mod:`~crasmra.inference.report`: the report's figures (:func:`compute_report`).
- :mod:`~crasmra.inference.markdown`: ``report.md`` and ``report.json`` (:func:`write_report`).

These modules log through :mod:`logging`; printing and progress bars belong to the CLI.
"""

from __future__ import annotations

from crasmra.inference.device import cpu_compute_plan, resolve_device, run_network
from crasmra.inference.evaluation import (
    COMBINED,
    DATA_KEYS,
    EvalOutputs,
    build_eval_dataset,
    evaluate,
    run_dataset_config,
)
from crasmra.inference.inputs import Failure, find_images
from crasmra.inference.loading import load_model, load_smram
from crasmra.inference.markdown import write_report
from crasmra.inference.prediction import Prediction, PredictionResult, ProgressFn, predict
from crasmra.inference.report import (
    MAX_REPORT_BYTES,
    MAX_REPORT_CLASSES,
    check_report_size,
    compute_report,
    expected_calibration_error,
)

__all__ = [
    "COMBINED",
    "DATA_KEYS",
    "MAX_REPORT_BYTES",
    "MAX_REPORT_CLASSES",
    "EvalOutputs",
    "Failure",
    "Prediction",
    "PredictionResult",
    "ProgressFn",
    "build_eval_dataset",
    "check_report_size",
    "compute_report",
    "cpu_compute_plan",
    "evaluate",
    "expected_calibration_error",
    "find_images",
    "load_model",
    "load_smram",
    "predict",
    "resolve_device",
    "run_dataset_config",
    "run_network",
    "write_report",
]
