"""What the backbone's frozen BatchNorm statistics see behind CRAM's suppressed maps.

With ``freeze_backbone_bn`` every BatchNorm layer of the backbone normalises with the
statistics it was pretrained with. CRAM's mask damps, in every image, the channel its
importances put first, in front of the next stage. For each trained checkpoint this script
feeds the training photos (evaluation view) through the network and compares, per backbone
segment (the stages between two attention modules), the inputs of the BatchNorm layers with
their running statistics:

- ``shift``: the mean over channels of ``|mean - running_mean| / sqrt(running_var + eps)``;
- ``scale``: the mean over channels of ``|log(var / running_var)|``;

once as the checkpoint computes (its omega) and once with the mask multiplying nothing
(omega 1, the same weights), for the segment's first BatchNorm layer (the one the suppressed
map reaches first) and for all of them. Then the held-out accuracy of two corrections:

- ``adabn``: every backbone BatchNorm layer's statistics recomputed on the training photos
  (AdaBN, Li et al., 2016);
- ``mask-corrected``: the first BatchNorm layer after each suppressed map keeps its
  pretrained statistics moved by what the mask alone changes (mean plus the difference, var
  times the ratio, of its inputs with and without the mask).

Example (the runs of EXPERIMENTS.md, "Nine cub10-shaped problems")::

    python benchmarks/bn_statistics.py --runs runs/valbed-related-runs/cra-smra-ep12 \\
        --problems runs/valbed-related --json bn-cra-smra.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from crasmra.data import create_dataset
from crasmra.inference.loading import load_model
from crasmra.model import Network

Moments = dict[nn.Module, tuple[Tensor, Tensor]]


def batchnorms(net: Network, image_size: tuple[int, int],
               ) -> list[list[nn.modules.batchnorm._BatchNorm]]:
    """The backbone's BatchNorm layers per segment, in the order they run: a layer belongs
    to the segment whose attention module has not yet run when it first runs."""
    segments: list[list[nn.modules.batchnorm._BatchNorm]] = [[] for _ in net.attention]
    current = [0]
    seen: set[int] = set()

    def on_bn(module: nn.Module, _inputs: object, _output: object) -> None:
        if id(module) not in seen:
            seen.add(id(module))
            segments[current[0]].append(module)

    def on_attention(index: int) -> Callable[..., None]:
        def hook(_module: nn.Module, _inputs: object, _output: object) -> None:
            current[0] = index + 1
        return hook

    hooks = [m.register_forward_hook(on_bn) for m in net.backbone.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    hooks += [a.register_forward_hook(on_attention(i)) for i, a in enumerate(net.attention)]
    with torch.no_grad():
        net.eval()(torch.zeros(1, 3, *image_size))
    for h in hooks:
        h.remove()
    return segments


@torch.no_grad()
def moments(net: Network, batches: Iterable[Tensor],
             layers: list[nn.modules.batchnorm._BatchNorm]) -> Moments:
    """Each layer's per-channel mean and variance of its input over ``batches``."""
    sums: dict[nn.Module, list] = {m: [0, 0.0, 0.0] for m in layers}

    def hook(module: nn.Module, inputs: tuple[Tensor, ...], _output: object) -> None:
        x = inputs[0].float()  # (B, C, H, W)
        s = sums[module]
        s[0] += x.shape[0] * x.shape[2] * x.shape[3]
        s[1] = s[1] + x.sum((0, 2, 3))
        s[2] = s[2] + (x * x).sum((0, 2, 3))

    hooks = [m.register_forward_hook(hook) for m in layers]
    net.eval()
    for images in batches:
        net(images)
    for h in hooks:
        h.remove()
    out = {}
    for m, (n, s1, s2) in sums.items():
        mean = s1 / n
        out[m] = (mean, (s2 / n - mean * mean).clamp_min(1e-12))
    return out


def mismatch(layers: list[nn.modules.batchnorm._BatchNorm], moments: Moments,
              ) -> tuple[float, float]:
    """(shift, scale) averaged over ``layers`` (see the module's docstring)."""
    shifts, scales = [], []
    for m in layers:
        mean, var = moments[m]
        running = m.running_var + m.eps
        shifts.append(((mean - m.running_mean).abs() / running.sqrt()).mean().item())
        scales.append((var / running).log().abs().mean().item())
    return statistics.mean(shifts), statistics.mean(scales)


@torch.no_grad()
def _accuracy(net: Network, batches: Iterable[tuple[Tensor, Tensor]]) -> float:
    net.eval()
    right = total = 0
    for images, target in batches:
        right += int((net(images).probs.argmax(1) == target).sum())
        total += len(target)
    return 100.0 * right / total


def _loaders(root: Path, net: Network, batch_size: int) -> tuple[list, list]:
    """A problem's training photos (all of them) and held-out ("test") photos, both in the
    checkpoint's evaluation view, as batches."""
    def batches(split: str) -> list[tuple[Tensor, Tensor]]:
        dataset = create_dataset("cub", root, split, transform=net.transform, val_fraction=0.0)
        return list(DataLoader(dataset, batch_size=batch_size))

    return batches("train"), batches("test")


def measure(checkpoint: Path, root: Path, batch_size: int = 32) -> dict:
    """Every number of the module's docstring for one trained checkpoint and its problem."""
    net = load_model(checkpoint)
    omega = float(net.config["omega"])
    train, held_out = _loaders(root, net, batch_size)
    images = [x for x, _ in train]
    segments = batchnorms(net, net.preprocessing.image_size)
    every = [m for seg in segments for m in seg]
    masked = moments(net, images, every)
    net.set_omega(1.0)
    unmasked = moments(net, images, every)
    net.set_omega(omega)
    result: dict = {"checkpoint": str(checkpoint), "omega": omega, "segments": []}
    for i, seg in enumerate(segments):
        result["segments"].append({
            "segment": i,
            "first": {"mask": mismatch(seg[:1], masked), "no_mask": mismatch(seg[:1], unmasked)},
            "all": {"mask": mismatch(seg, masked), "no_mask": mismatch(seg, unmasked)},
        })
    result["held_out"] = _accuracy(net, held_out)
    # The mask-corrected statistics of the first layer after each suppressed map, then the
    # statistics as loaded again.
    firsts = [seg[0] for seg in segments[1:] if seg]
    saved = {m: (m.running_mean.clone(), m.running_var.clone()) for m in every}
    for m in firsts:
        (mean_m, var_m), (mean_u, var_u) = masked[m], unmasked[m]
        m.running_mean += mean_m - mean_u
        m.running_var *= var_m / var_u
    result["mask_corrected"] = _accuracy(net, held_out)
    for m, (mean, var) in saved.items():
        m.running_mean.copy_(mean)
        m.running_var.copy_(var)
    # AdaBN: every backbone layer's statistics recomputed (cumulative average) on the photos.
    for m in every:
        m.reset_running_stats()
        m.momentum = None
    net.eval()
    for m in every:
        m.train()
    with torch.no_grad():
        for x in images:
            net(x)
    result["adabn"] = _accuracy(net.eval(), held_out)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, required=True, action="append",
                        help="a setting's folder of problem-<j>/checkpoints/last.ckpt "
                             "(repeatable)")
    parser.add_argument("--problems", type=Path, required=True,
                        help="the problems' folder (problem-<j>/CUB_200_2011)")
    parser.add_argument("--count", type=int, default=9, help="problems 0..count-1")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, help="write every number here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = {}
    for runs in args.runs:
        per = []
        for j in range(args.count):
            ckpt = runs / f"problem-{j}" / "checkpoints" / "last.ckpt"
            per.append(measure(ckpt, args.problems / f"problem-{j}" / "CUB_200_2011"))
            print(f"{runs.name} problem {j}: held-out {per[-1]['held_out']:.1f}, "
                  f"mask-corrected {per[-1]['mask_corrected']:.1f}, "
                  f"AdaBN {per[-1]['adabn']:.1f}", file=sys.stderr, flush=True)
        rows[runs.name] = per
    print("| setting | segment | first BN: shift, mask / no mask | first BN: scale, mask / "
          "no mask | all BNs: scale, mask / no mask |")
    print("| --- | ---: | --- | --- | --- |")
    for name, per in rows.items():
        for i in range(len(per[0]["segments"])):
            def avg(part: str, which: str, k: int, i: int = i, per: list = per) -> float:
                return statistics.mean(p["segments"][i][part][which][k] for p in per)
            print(f"| {name} | {i} | {avg('first', 'mask', 0):.2f} / "
                  f"{avg('first', 'no_mask', 0):.2f} | {avg('first', 'mask', 1):.2f} / "
                  f"{avg('first', 'no_mask', 1):.2f} | {avg('all', 'mask', 1):.2f} / "
                  f"{avg('all', 'no_mask', 1):.2f} |")
    print()
    print("| setting | held-out top-1 | mask-corrected statistics | AdaBN |")
    print("| --- | ---: | ---: | ---: |")
    for name, per in rows.items():
        cells = [statistics.mean(p[k] for p in per) for k in ("held_out", "mask_corrected",
                                                              "adabn")]
        print(f"| {name} | " + " | ".join(f"{c:.1f}" for c in cells) + " |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
