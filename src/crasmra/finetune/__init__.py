"""Fine-tuning policies that keep what a pretrained backbone knows.

Not part of the paper's recipe; each is a switch of the training engine, off by default, and
each lives in a module of its own (imprinting, head-path initialisation, combination weights,
suppression warm-up):

- :func:`imprint_classifiers` (``--model.finetune.head_init imprint``): before the first step, every
  classifier's last linear layer is set to the nearest-class-mean classifier of its own input
  features (weight imprinting, Qi et al., CVPR 2018, on centred features as in SimpleShot,
  Wang et al., 2019). A randomly initialised head starts at chance and, with few steps,
  pulls the combined prediction below what the pretrained features already separate; an
  imprinted head starts where a nearest-class-mean classifier on those features is.
- :func:`init_head_paths` (``--model.finetune.head_path_init identity``): before imprinting,
  the layers between a stage's map and its classifier (the projection ``Conv_layer`` and the head's
  hidden layer) start as close to the identity on what the backbone knows as their shapes
  allow: the projection keeps the span of the stage's class means (as +/- pairs, so that its
  ReLU drops no sign) and every BatchNorm on the way starts as the identity on the training
  images. A random projection and hidden layer otherwise scramble the pretrained features
  before the imprinted classifier reads them (on cub100 with one photo per class the
  stage-5 head's nearest class mean falls from 50.6% to 41.1%, EXPERIMENTS.md).
  The pairs it records (:class:`HeadPaths`) let ``--model.finetune.imprint_signed`` fit the
  classifiers on the pairs' differences, so that each stage head starts linear in its pooled map.
- :func:`neutral_cram_start` (``--model.finetune.cram_init neutral``): CRAM's importance MLP
  starts with its last layer scaled down, so every channel starts at nearly the same
  importance and ``x_e`` at the stage's map rescaled, instead of a random reweighting of the
  pretrained channels before the heads read them. Training moves the importances from there.
- :class:`SuppressionWarmup` (``--model.finetune.suppression_warmup_epochs``): CRAM's suppression
  factor omega rises from 1 (no suppression) to its configured value over the first epochs,
  so the later pretrained stages meet the suppressed maps gradually instead of at the first
  step. After the warm-up the network computes the paper's equations unchanged.
- :func:`mix_weights` (``--model.finetune.wise_alpha``): after the last step every weight becomes
  a mix of where it started (the pretrained backbone with fitted heads) and where training
  took it (WiSE-FT, Wortsman et al., CVPR 2022), so that a few noisy steps cannot carry the
  network far from what the backbone knew.
- :class:`TrajectoryAverage` (``--model.finetune.ema_epochs``): after the last step every weight
  becomes its exponential moving average along the steps (Polyak averaging), so that the
  result does not hang on the last batches one run drew.
"""

from __future__ import annotations

from crasmra.finetune.attention_init import NEUTRAL_SCALE, neutral_cram_start
from crasmra.finetune.choices import (
    COMBINES,
    CRAM_INITS,
    CRAM_SUPPRESSIONS,
    HEAD_INITS,
    HEAD_PATH_DIRECTIONS,
    HEAD_PATH_INITS,
    IMPRINT_TRANSFORMS,
)
from crasmra.finetune.combination import fit_head_weights
from crasmra.finetune.head_paths import HeadPaths, init_head_paths
from crasmra.finetune.imprint import (
    ImprintReport,
    calibrate_batchnorm,
    classifier_layers,
    imprint_classifiers,
    imprint_linear,
)
from crasmra.finetune.ncm import (
    FALLBACK_LOGIT_SCALE,
    centred_directions,
    fit_logit_scale,
    leave_one_out_logits,
)
from crasmra.finetune.suppression import SuppressionWarmup
from crasmra.finetune.trajectory_average import TrajectoryAverage, ema_decay
from crasmra.finetune.weight_ensemble import mix_weights, snapshot_state

__all__ = [
    "COMBINES",
    "CRAM_INITS",
    "CRAM_SUPPRESSIONS",
    "FALLBACK_LOGIT_SCALE",
    "HEAD_INITS",
    "HEAD_PATH_DIRECTIONS",
    "HEAD_PATH_INITS",
    "IMPRINT_TRANSFORMS",
    "NEUTRAL_SCALE",
    "HeadPaths",
    "ImprintReport",
    "SuppressionWarmup",
    "TrajectoryAverage",
    "calibrate_batchnorm",
    "centred_directions",
    "classifier_layers",
    "ema_decay",
    "fit_head_weights",
    "fit_logit_scale",
    "imprint_classifiers",
    "imprint_linear",
    "init_head_paths",
    "leave_one_out_logits",
    "mix_weights",
    "neutral_cram_start",
    "snapshot_state",
]
