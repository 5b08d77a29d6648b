"""Where the network's weights start before training: another run's weights
(``--model.runtime.init_from``), and imprinted heads (``--model.finetune.head_init imprint``)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch

from crasmra.checkpoint import read_network_state
from crasmra.data.sampling import with_transform
from crasmra.engine.parts import FinetuneConfig
from crasmra.finetune import (
    fit_head_weights,
    imprint_classifiers,
    init_head_paths,
    neutral_cram_start,
)
from crasmra.model import Network

__all__ = [
    "apply_checkpoint_metadata",
    "head_state_keys",
    "imprint_heads",
    "init_network_from",
    "start_fresh_run",
    "training_batches",
]

log = logging.getLogger(__name__)


def head_state_keys(net: Network) -> set[str]:
    """State-dict keys of the classifier heads (parameters and BN buffers)."""
    head_params = {id(p) for p in net.parameter_groups()["heads"]}
    head_modules = {
        name
        for name, module in net.named_modules()
        if any(id(p) in head_params for p in module.parameters(recurse=False))
    }
    return {key for key in net.state_dict() if key.rsplit(".", 1)[0] in head_modules}


def init_network_from(net: Network, path: str, reinit_heads: bool) -> None:
    """Load another run's weights into ``net`` (fine-tuning, not resuming).

    Raises:
        ValueError: The file's class count or weights do not fit ``net``.
    """
    state, source_classes = read_network_state(path)
    head_keys = head_state_keys(net)
    if reinit_heads:
        state = {k: v for k, v in state.items() if k not in head_keys}
    elif source_classes is not None and source_classes != net.num_classes:
        raise ValueError(
            f"{path} was trained for {source_classes} classes but the data has "
            f"{net.num_classes}; add --model.runtime.reinit_heads true to fine-tune it with "
            "new classifier heads."
        )
    missing, unexpected = net.load_state_dict(state, strict=False)
    if reinit_heads:
        missing = [k for k in missing if k not in head_keys]
    if missing or unexpected:
        raise ValueError(
            f"{path} does not fit this network ({net.config['backbone']}, "
            f"variant={net.variant}): {len(missing)} missing keys (first: "
            f"{missing[:3]}), {len(unexpected)} unexpected keys (first: {unexpected[:3]})."
        )
    log.info("Initialised the network from %s%s", path, " (new heads)" if reinit_heads else "")


def imprint_heads(
    net: Network,
    batches: Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor]]],
    finetune: FinetuneConfig,
) -> None:
    """Imprint every head on the training images (and first, with ``head_path_init
    identity``, set the paths to them); with ``combine fitted``, weigh the heads.

    Args:
        net: The network.
        batches: Returns the training images and labels in order, on the network's device.
        finetune: The fine-tuning part.
    """
    # A network without attention (plain) has no projection or head MLP: nothing to initialise.
    identity_paths = finetune.head_path_init == "identity" and len(net.attention) > 0
    signed_pairs: dict[str, int] | None = None
    # The training transform's random draws must not shift the training run's own.
    with torch.random.fork_rng(devices=[]):
        if identity_paths:
            # The span the imprint reads: centred class means for the centred imprint,
            # the means themselves (their mean's direction too) for the uncentred one.
            paths = init_head_paths(net, batches, net.num_classes,
                                    finetune.head_path_directions,
                                    centred=finetune.imprint_centered)
            log.info(
                "Initialised the projections and heads as the identity on the training "
                "images' features (directions kept: %s).",
                ", ".join(f"{name} {count}" for name, count in paths.kept.items()),
            )
            if finetune.imprint_signed:
                signed_pairs = paths.signed_pairs
        report = imprint_classifiers(
            net, batches, net.num_classes, finetune.imprint_logit_scale,
            calibrate=not identity_paths, centered=finetune.imprint_centered,
            probe=finetune.head_init == "probe", signed_pairs=signed_pairs,
        )
    log.info(
        "Imprinted the heads with the class means of their features (nearest class mean "
        "on the training images, logit scale): %s.",
        report.describe(),
    )
    if report.probe_decay:
        log.info("Refitted the heads' classifiers as logistic regressions of their features "
                 "(linear probe): %s.", report.describe_probe())
    if finetune.combine == "fitted" and len(net.head_names) > 1:
        # With a single photo per class nothing can be held out: the head that reads the
        # backbone's last stage then decides alone (with final_features it is the nearest
        # class mean of the pretrained classifier's features).
        last_stage = [0.0] * len(net.head_names)
        last_stage[len(net.stage_names) - 1] = 1.0
        weights = fit_head_weights(report.loo_probs, report.loo_labels, fallback=last_stage)
        net.set_head_weights(weights)
        log.info(
            "Combined prediction: the heads weighted %s (fitted to the leave-one-out "
            "predictions of the training images).",
            ", ".join(f"{n} {w:.2f}" for n, w in zip(net.head_names, weights, strict=True)),
        )


def start_fresh_run(
    net: Network,
    finetune: FinetuneConfig,
    cram_trains: bool,
    batches: Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor]]],
) -> None:
    """Before the first step of a run that does not resume: CRAM's start
    (``--model.finetune.cram_init``) and its suppression (``cram_suppression``), then the
    imprinted heads (``head_init``).

    Args:
        net: The network.
        finetune: The fine-tuning part.
        cram_trains: Whether the attention modules train in this run (``cram_init auto``
            starts CRAM neutral, and ``cram_suppression trained`` sets omega to 1, only
            where they do not).
        batches: Returns the training images and labels in order, on the network's device.
    """
    cram_init = finetune.cram_init
    if cram_init == "auto":
        # Where CRAM trains, it moves its importances itself; where it does not, a random
        # start would stay a random reweighting of the pretrained channels.
        cram_init = "random" if cram_trains else "neutral"
    if cram_init == "neutral":
        changed = neutral_cram_start(net)  # 0 for variants without CRAM
        if changed:
            log.info("CRAM's channel importances start nearly equal "
                     "(--model.finetune.cram_init %s): %d module(s).", finetune.cram_init,
                     changed)
    # Untrained, CRAM's mask would damp whichever channel its starting weights rank first,
    # in every image, in front of the pretrained later stages. Set before the heads are
    # imprinted, so that they are fitted to the maps the run will see.
    lift_mask = finetune.cram_suppression == "trained" and not cram_trains
    if lift_mask and net.set_omega(1.0):
        log.info("CRAM does not train in this run: its mask suppresses nothing (omega 1, "
                 "--model.finetune.cram_suppression trained).")
    if finetune.imprints:
        imprint_heads(net, batches, finetune)


def training_batches(
    trainer: Any, channels_last: bool, transform: str = "train"
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The training images and labels, in order, on the trainer's device.

    Args:
        trainer: The Lightning trainer (its training loader, and its data module).
        channels_last: Hand the images over in channels-last memory format.
        transform: ``"train"``: through the training loader's own transform (random crops
            and flips); ``"eval"``: through the data module's evaluation transform (the view
            of an image that validation, test and predict see), where the data module has one
            (``build_transform``); otherwise the training transform, with a warning.
    """
    # A loader of its own over the training set, in order and in this process: iterating
    # the trainer's loader here would start its (persistent) workers and its sampler's
    # epoch out of turn.
    train_loader = trainer.train_dataloader
    dataset = train_loader.dataset
    if transform == "eval":
        datamodule = getattr(trainer, "datamodule", None)
        build = getattr(datamodule, "build_transform", None)
        view = with_transform(dataset, build(train=False)) if callable(build) else None
        if view is None:
            log.warning("The training images have no evaluation transform to imprint from "
                        "(no data module with build_transform); imprinting from the "
                        "training transform.")
        else:
            dataset = view
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=train_loader.batch_size or 1, shuffle=False,
        num_workers=0, collate_fn=train_loader.collate_fn)
    for batch in loader:
        images, target = trainer.strategy.batch_to_device(batch)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        yield images, target


def apply_checkpoint_metadata(net: Network, meta: Any, evaluating: bool) -> None:
    """Restore what a checkpoint's ``crasmra`` entry holds beyond the weights (fitted head
    weights, CRAM's omega), after checking that it was trained for ``net``'s classes.

    Raises:
        ValueError: No ``crasmra`` entry, or another class count (with the remedy).
    """
    if meta is None:
        raise ValueError("This checkpoint was not written by crasmra (no 'crasmra' entry).")
    saved = meta["net_config"]
    if saved.get("num_classes") == net.num_classes:
        # Fitted head weights live in the network's config, not in its state dict.
        if saved.get("head_weights") is not None:
            net.set_head_weights(saved["head_weights"])
        # So does the omega the weights were trained with (cram_suppression trained sets
        # it per run), so that test and resume see the network predict and export rebuild.
        omega, configured = saved.get("omega"), net.config.get("omega")
        if omega is not None and omega != configured and net.set_omega(omega):
            log.info("The checkpoint's network suppresses with omega %g (not the configured "
                     "%g).", omega, configured)
        return
    if evaluating:
        remedy = ("Evaluate it on the data it was trained on: pass that run's --config, or "
                  "no --config and no --data options to use the data settings stored in "
                  "the checkpoint.")
    else:
        remedy = ("To fine-tune it on this data, start a new run with "
                  "--model.runtime.init_from CKPT --model.runtime.reinit_heads true instead "
                  "of --ckpt_path.")
    raise ValueError(f"The checkpoint was trained for {saved.get('num_classes')} classes "
                     f"but the data has {net.num_classes}. {remedy}")
