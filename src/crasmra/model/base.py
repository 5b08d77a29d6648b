"""What every network variant offers: the interface the engine, inference and exports use."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor, nn

from crasmra.backbones import StagedBackbone
from crasmra.data.transforms import Preprocessing
from crasmra.layers import check_omega
from crasmra.model.config import NetConfig, is_int, normalized_head_weights
from crasmra.outputs import ModelOutput

__all__ = ["Network"]


class Network(nn.Module):
    """A staged timm backbone and its heads; subclasses build one variant each.

    Subclasses set up their modules, then call :meth:`_finish`; they implement
    :attr:`head_names`, :meth:`classifier_layers`, :meth:`added_modules`,
    :meth:`parameter_groups`, :meth:`forward_features`, :meth:`forward_heads` and
    :meth:`_new_heads`.

    Attributes:
        config: JSON-serialisable constructor arguments (``pretrained`` forced to False), so
            :func:`~crasmra.model.build_network` ``(**net.config)`` rebuilds the architecture.
        variant: The variant name.
        num_classes: K.
        head_channels: C_a.
        stage_names: e.g. ``("stage3", "stage4", "stage5")``.
        data_config: timm's preprocessing config for the backbone (mean, std, input_size,
            crop_pct, interpolation). The paper trains at 448 px; input_size is timm's.
        backbone: The :class:`~crasmra.backbones.StagedBackbone`.
        attention: One attention module per attended stage (empty when there is none).
        head_weights: Weights of the heads in the combined prediction; None for equal ones.
        classes: Class names in label order; set for a loaded model
            (:func:`crasmra.inference.load_model`), else None.
        preprocessing: The :class:`~crasmra.data.Preprocessing` its images need; set for a
            loaded model, else None.
        transform: ``preprocessing``'s eval transform; set for a loaded model, else None.
        checkpoint_path: The file a loaded model came from, else None.
    """

    def __init__(
        self, cfg: NetConfig, backbone: StagedBackbone, stage_names: tuple[str, ...]
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.variant = cfg.variant
        self.num_classes = cfg.num_classes
        self.head_channels = cfg.head_channels
        self.stage_names: tuple[str, ...] = stage_names
        self.data_config: dict[str, Any] = dict(backbone.data_config)
        self.attention = nn.ModuleList()
        self.head_weights: tuple[float, ...] | None = None
        # What inference needs besides the weights; plain attributes (not submodules or
        # buffers), so state_dict() and exports are unchanged.
        self.classes: list[str] | None = None
        self.preprocessing: Preprocessing | None = None
        self.transform: Callable | None = None
        self.checkpoint_path: str | None = None

    def _finish(self, cfg: NetConfig) -> None:
        """Record the configuration once every module exists."""
        cfg.stage_indices = list(self.backbone.stage_indices)
        self.config: dict[str, Any] = cfg.as_dict()
        if cfg.head_weights is not None:
            self.set_head_weights(cfg.head_weights)

    # ------------------------------------------------------------------ what a variant defines
    @property
    def head_names(self) -> tuple[str, ...]:
        """Names of the heads, in the order of ``ModelOutput.logits``."""
        raise NotImplementedError

    def classifier_layers(self) -> dict[str, nn.Module]:
        """The last layer of every head, by head name (the one that outputs K logits)."""
        raise NotImplementedError

    def added_modules(self) -> list[nn.Module]:
        """The modules added to the pretrained backbone (attention and heads)."""
        raise NotImplementedError

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters by learning-rate group: ``backbone``, ``attention``, ``heads``;
        every trainable parameter is in exactly one group."""
        raise NotImplementedError

    def forward_features(self, x: Tensor) -> tuple[Tensor, ...]:
        """The maps the heads read, one per head-reading stage."""
        raise NotImplementedError

    def forward_heads(self, features: Sequence[Tensor]) -> ModelOutput:
        """Classify the maps :meth:`forward_features` returned (e.g. detached, for Grad-CAM)."""
        raise NotImplementedError

    def _new_heads(self, num_classes: int) -> None:
        """Replace the classifiers with fresh ones for ``num_classes`` classes."""
        raise NotImplementedError

    # ------------------------------------------------------------------ shared behaviour
    def forward(self, x: Tensor) -> ModelOutput:
        """Classify (B, 3, H, W) images; the same computation in train and eval mode."""
        return self.forward_heads(self.forward_features(x))

    def reset_classifier(self, num_classes: int) -> None:
        """Replace every classifier with a fresh one for ``num_classes`` classes."""
        if not is_int(num_classes) or num_classes < 1:
            raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}.")
        # Weights fitted to the old heads say nothing of the new ones.
        self.set_head_weights(None)
        self._new_heads(num_classes)
        self.num_classes = num_classes
        self.config["num_classes"] = num_classes

    def set_head_weights(self, weights: Sequence[float] | None) -> None:
        """Weight the heads in the combined prediction (None: the paper's equal weights).

        Args:
            weights: One non-negative weight per head of :attr:`head_names`; normalised to
                sum 1 and recorded in :attr:`config`, so checkpoints and exports keep them.
        """
        if weights is None:
            self.head_weights = None
            self.config["head_weights"] = None
            return
        if len(weights) != len(self.head_names):
            raise ValueError(
                f"head_weights needs one weight per head {self.head_names}, got {len(weights)}."
            )
        normalized = normalized_head_weights(weights)
        self.head_weights = tuple(normalized)
        self.config["head_weights"] = normalized

    def set_omega(self, omega: float) -> int:
        """Set the suppression factor of every attention module that has one (CRAM's mask).

        Args:
            omega: The factor, in [0, 1]; recorded in :attr:`config`, so that checkpoints and
                exports rebuild the network with it.

        Returns:
            The number of modules whose mask it changes (0 for variants without CRAM).
        """
        omega = check_omega(omega)
        modules = [m for m in self.attention if hasattr(m, "omega")]
        for module in modules:
            module.omega = omega
        self.config["omega"] = omega
        return len(modules)

    def resolved_preprocessing(self) -> Preprocessing:
        """:attr:`preprocessing`, or for a network not loaded from a checkpoint the backbone's
        own (timm's ``data_config``: its input size, mean and std)."""
        if self.preprocessing is not None:
            return self.preprocessing
        config = self.data_config
        return Preprocessing.from_config({
            "image_size": list(config.get("input_size", (3, 448, 448)))[1:],
            **{k: config[k] for k in ("mean", "std") if k in config},
        })

    def set_inference_info(
        self,
        classes: Sequence[str],
        preprocessing: Preprocessing,
        checkpoint_path: str | None = None,
    ) -> None:
        """Record the class names and the preprocessing of a trained network."""
        if len(classes) != self.num_classes:
            raise ValueError(
                f"{len(classes)} class names for a network of {self.num_classes} classes."
            )
        self.classes = list(classes)
        self.preprocessing = preprocessing
        self.transform = preprocessing.transform()
        self.checkpoint_path = checkpoint_path
