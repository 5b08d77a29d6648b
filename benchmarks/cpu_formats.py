"""CPU training and inference speed per backbone x memory format x precision x threads.

What :func:`crasmra.cpu.plan_compute` chooses for a backbone on this CPU is read off this
table: one training step of the ``cra-smra`` network (forward, CRA-SMRA loss with SMRAM,
backward, SGD step, as ``train_step.py`` times it) and one inference forward pass under
``torch.inference_mode``, for NCHW and channels-last, fp32 and bf16 autocast, each thread
count. bf16 is timed only where the CPU computes it natively (AVX512-BF16 or AMX), unless
``--bf16 always``: elsewhere oneDNN emulates it and it is never chosen.

Candidates of one backbone and thread count run in turn (A, B, C, D, A, ...) for several
rounds; images/s is the batch over the median time per call.

Usage::

    python benchmarks/cpu_formats.py                       # the BENCHMARKS.md table
    python benchmarks/cpu_formats.py --backbones resnet10t:56:32 --threads 1
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass

import torch

from benchlib import Candidate, environment, markdown_table, time_alternating
from crasmra.cpu import cpu_bf16_support, cpu_flags_summary, keep_freed_memory, plan_compute
from train_step import StepConfig, TrainStep

#: backbone:size:batch, as each is trained here (lite0 and resnet50 at the real-data recipes'
#: 224 px, resnet10t at the demo's 56 px).
DEFAULT_BACKBONES = (
    "tf_efficientnet_lite0:224:16",
    "resnet50:224:16",
    "resnet10t:56:32",
    "densenet161:224:8",
    "convnext_atto:224:16",
)


@dataclass
class Row:
    backbone: str
    size: int
    batch: int
    threads: int
    channels_last: bool
    dtype: str
    train_ips: float
    train_spread: float
    infer_ips: float
    infer_spread: float


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbones", nargs="+", default=list(DEFAULT_BACKBONES),
                        metavar="NAME:SIZE:BATCH")
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--bf16", choices=("auto", "always", "never"), default="auto",
                        help="time bf16 autocast: where the CPU has it natively (auto), "
                        "always, or never")
    parser.add_argument("--allocator", choices=("keep", "default"), default="keep",
                        help="keep freed memory for reuse as crasmra's commands do "
                        "(crasmra.cpu.keep_freed_memory), or glibc's defaults")
    parser.add_argument("--infer-batch", type=int, default=32)
    parser.add_argument("--num-classes", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output", default=None, help="also write the tables to this file")
    return parser.parse_args(argv)


def _inference_candidate(step: TrainStep, batch: int, size: int, name: str) -> Candidate:
    net = step.net
    images = torch.randn(batch, 3, size, size).contiguous(memory_format=step.memory_format)

    def run() -> None:
        net.eval()
        with torch.inference_mode(), torch.autocast(
            "cpu", dtype=torch.bfloat16, enabled=step.cfg.dtype == "bf16"
        ):
            net(images)
        net.train()

    return Candidate(name, run, items=batch)


def measure(spec: str, threads: int, dtypes: list[str], args: argparse.Namespace) -> list[Row]:
    name, size, batch = spec.split(":")
    size_px, batch_n = int(size), int(batch)
    torch.set_num_threads(threads)
    combos = [(cl, dt) for dt in dtypes for cl in (False, True)]
    steps = {
        combo: TrainStep("cra-smra", StepConfig(
            backbone=name, num_classes=args.num_classes, size=size_px, batch=batch_n,
            device="cpu", dtype=combo[1], channels_last=combo[0],
        ))
        for combo in combos
    }

    def label(combo: tuple[bool, str]) -> str:
        return f"{'channels_last' if combo[0] else 'NCHW'} {combo[1]}"

    train = [Candidate(label(c), s.step, items=batch_n) for c, s in steps.items()]
    infer = [_inference_candidate(s, args.infer_batch, size_px, label(c)) for c, s in steps.items()]
    device = torch.device("cpu")

    def log(msg: str) -> None:
        print(f"[{name} {threads}t] {msg}", file=sys.stderr, flush=True)

    kw = {"warmup": args.warmup, "iters": args.iters, "rounds": args.rounds, "log": log}
    time_alternating(train, device, **kw)
    time_alternating(infer, device, **kw)
    return [
        Row(name, size_px, batch_n, threads, combo[0], combo[1],
            t.items / t.median, t.spread, i.items / i.median, i.spread)
        for combo, t, i in zip(combos, train, infer, strict=True)
    ]


def tables(rows: list[Row]) -> str:
    out = []
    header = ["backbone (px, batch)", "threads", "format", "precision",
              "train img/s", "spread", "infer img/s", "spread", "x NCHW fp32 (train)"]
    body = []
    for r in rows:
        ref = next(x for x in rows if (x.backbone, x.threads) == (r.backbone, r.threads)
                   and not x.channels_last and x.dtype == "fp32")
        body.append([
            f"{r.backbone} ({r.size}, {r.batch})", str(r.threads),
            "channels_last" if r.channels_last else "NCHW", r.dtype,
            f"{r.train_ips:.1f}", f"{r.train_spread:.0%}", f"{r.infer_ips:.1f}",
            f"{r.infer_spread:.0%}", f"{r.train_ips / ref.train_ips:.2f}",
        ])
    out.append(markdown_table(header, body))
    chosen = []
    for spec in dict.fromkeys(r.backbone for r in rows):
        plan = plan_compute(spec)
        best = max((r for r in rows if r.backbone == spec and r.threads == max(
            x.threads for x in rows if x.backbone == spec)), key=lambda r: r.train_ips)
        chosen.append([spec, plan.describe_choice(),
                       f"{'channels_last' if best.channels_last else 'NCHW'} {best.dtype}"])
    out.append(markdown_table(["backbone", "plan_compute chooses", "fastest measured"], chosen))
    return "\n\n".join(out)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    kept = keep_freed_memory() if args.allocator == "keep" else False
    native = cpu_bf16_support()
    dtypes = ["fp32"] + (["bf16"] if args.bf16 == "always" or (args.bf16 == "auto" and native)
                         else [])
    start = time.time()
    rows: list[Row] = []
    for spec in args.backbones:
        for threads in args.threads:
            rows.extend(measure(spec, threads, dtypes, args))
    env = environment(torch.device("cpu"))
    env.pop("torch threads", None)
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    text = (
        "; ".join(f"{k}: {v}" for k, v in env.items())
        + f"; CPU flags: {cpu_flags_summary()}; native bf16: {native}; allocator: "
        f"{'freed memory kept' if kept else 'glibc defaults'}; load average at the "
        f"end: {load}; {time.time() - start:.0f} s\n\n{tables(rows)}\n"
    )
    print(text)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text)


if __name__ == "__main__":
    main()
