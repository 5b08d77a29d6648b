"""Safe reading of crasmra checkpoints and weights files.

Checkpoints are read with ``torch.load(weights_only=True)`` or from safetensors, never by
unpickling arbitrary objects, and every failure is turned into a :class:`CheckpointError`
whose message says what is wrong with the file and what to do.

- :mod:`~crasmra.checkpoint.format`: the layout (format version, key prefixes, limits) and
  the ``"crasmra"`` metadata entry.
- :mod:`~crasmra.checkpoint.reading`: loading files, the network's and SMRAM's weights,
  safetensors exports.
- :mod:`~crasmra.checkpoint.metadata`: the metadata and stored data settings, checked.
- :mod:`~crasmra.checkpoint.network`: the contents checked against the network they describe.
- :mod:`~crasmra.checkpoint.archive`: zip checksums and bombs.
- :mod:`~crasmra.checkpoint.arguments`: a command's checkpoint argument.

What a file is (:func:`file_kind`) lives in :mod:`crasmra.file_kinds` and guarding a command's
outputs (:func:`check_output`) in :mod:`crasmra.files`; both are importable from here too.
"""

from __future__ import annotations

from crasmra.checkpoint.archive import verify_zip_integrity, weights_only_reason
from crasmra.checkpoint.arguments import check_checkpoint_argument
from crasmra.checkpoint.format import (
    FORMAT_VERSION,
    MAX_CLASSES,
    MAX_HEAD_WIDTH,
    MAX_IMAGE_SIDE,
    MAX_ZIP_EXPANSION,
    NET_PREFIX,
    SMRAM_PREFIX,
    ZIP_SLACK_BYTES,
    CheckpointError,
    build_metadata,
    network_hparams,
)
from crasmra.checkpoint.metadata import (
    STORED_DATA_KEYS,
    check_data_settings,
    checkpoint_metadata,
    validate_metadata,
)
from crasmra.checkpoint.network import check_network_state, read_classes, read_preprocessing
from crasmra.checkpoint.reading import (
    load_checkpoint_file,
    network_state_dict,
    read_network_state,
    save_safetensors,
    smram_state_dict,
)
from crasmra.file_kinds import (
    CHECKPOINT_SUFFIXES,
    SAFETENSORS_META_KEY,
    TORCHSCRIPT_META,
    file_kind,
)
from crasmra.files import check_output

__all__ = [
    "CHECKPOINT_SUFFIXES",
    "FORMAT_VERSION",
    "MAX_CLASSES",
    "MAX_HEAD_WIDTH",
    "MAX_IMAGE_SIDE",
    "MAX_ZIP_EXPANSION",
    "NET_PREFIX",
    "SAFETENSORS_META_KEY",
    "SMRAM_PREFIX",
    "STORED_DATA_KEYS",
    "TORCHSCRIPT_META",
    "ZIP_SLACK_BYTES",
    "CheckpointError",
    "build_metadata",
    "check_checkpoint_argument",
    "check_data_settings",
    "check_network_state",
    "check_output",
    "checkpoint_metadata",
    "file_kind",
    "load_checkpoint_file",
    "network_hparams",
    "network_state_dict",
    "read_classes",
    "read_network_state",
    "read_preprocessing",
    "save_safetensors",
    "smram_state_dict",
    "validate_metadata",
    "verify_zip_integrity",
    "weights_only_reason",
]
