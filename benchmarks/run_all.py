"""Run every benchmark (training step, inference, cost, memory, input pipeline) and print tables.

Usage::

    # CPU, as recorded in BENCHMARKS.md
    python benchmarks/run_all.py --device cpu --size 224 --batch 8 --backbones resnet50
    # GPU (what benchmarks/gpu.sh runs)
    python benchmarks/run_all.py --device cuda --size 448 --batch 32 --dtype bf16 \
        --channels-last --compile both --peak-tflops 989

Every table is markdown; ``--output FILE`` also writes them to FILE.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchlib import environment, markdown_table, pick_device, time_alternating
from inference import InferConfig, infer_table
from inference import build_candidates as infer_candidates
from input_pipeline import (
    jpeg_size_kb,
    loader_rate,
    make_jpegs,
    per_worker_rates,
    pipeline_table,
)
from train_step import STEP_KINDS, StepConfig, step_memory_mb, train_table
from train_step import build_candidates as train_candidates

PARTS: tuple[str, ...] = ("train", "infer", "memory", "pipeline")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--size", type=int, default=224, help="input height and width")
    p.add_argument("--batch", type=int, default=8, help="training batch")
    p.add_argument("--throughput-batch", type=int, default=32, help="inference throughput batch")
    p.add_argument("--num-classes", type=int, default=200)
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"),
                   help="bf16 = bf16 autocast (Lightning's bf16-mixed)")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", default="off", choices=("off", "on", "both"))
    p.add_argument("--compile-kinds", default="plain,cra-smra",
                   help="step kinds also timed compiled (compiling all six costs minutes)")
    p.add_argument("--backbones", default="resnet50", help="comma-separated timm names")
    p.add_argument("--kinds", default=",".join(STEP_KINDS), help="training step kinds")
    p.add_argument("--parts", default=",".join(PARTS), help=f"subset of {PARTS}")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=2, help="calls per timed round")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds (median reported)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="device peak for MFU, e.g. 989 (H200 bf16 dense)")
    p.add_argument("--pipeline-images", type=int, default=48)
    p.add_argument("--loader-workers", default="1,2",
                   help="DataLoader worker counts to time on the pil path (empty: skip)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (CPU); 1 avoids OpenMP barrier stalls when "
                        "the cores are shared with other jobs")
    p.add_argument("--output", type=Path, default=None, help="also write the tables here")
    args = p.parse_args(argv)
    unknown = set(args.parts.split(",")) - set(PARTS)
    if unknown:
        p.error(f"unknown parts {sorted(unknown)}; choose from {PARTS}")
    return args


def run(argv: list[str] | None = None) -> str:
    """Run the selected parts and return the markdown report (also printed)."""
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    parts = args.parts.split(",")
    kinds = args.kinds.split(",")
    compile_modes = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    out: list[str] = []

    def emit(text: str = "") -> None:
        print(text, flush=True)
        out.append(text)

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    env = environment(device)
    emit("## Environment\n")
    emit(markdown_table(["item", "value"], list(env.items())))
    emit(f"\nCommand: `python benchmarks/run_all.py {' '.join(argv or sys.argv[1:])}`")
    emit(f"Date: {time.strftime('%Y-%m-%d %H:%M %Z')}\n")
    train_rates: dict[str, float] = {}
    for backbone in args.backbones.split(","):
        for compiled in compile_modes:
            tag = (f"{backbone} @ {args.size}px, {args.dtype}, "
                   f"{'channels_last' if args.channels_last else 'NCHW'}, "
                   f"compile {'on' if compiled else 'off'}")
            step_kinds = [k for k in kinds if not compiled or k in args.compile_kinds.split(",")]
            cfg = StepConfig(backbone, args.num_classes, args.size, args.batch, str(device),
                             args.dtype, args.channels_last, compiled)
            if "train" in parts and step_kinds:
                log(f"training step: {tag}")
                cands = train_candidates(step_kinds, cfg)
                time_alternating(cands, device, warmup=args.warmup + compiled, iters=args.iters,
                                 rounds=args.rounds, log=log)
                memory = None
                if "memory" in parts:
                    log("peak memory")
                    memory = {k: step_memory_mb(k, cfg, c.extra["step"])
                              for k, c in zip(step_kinds, cands, strict=True)}
                emit(f"### Training step, batch {args.batch}: {tag}\n")
                emit(train_table(cands, args.peak_tflops, memory))
                emit()
                for c in cands:
                    train_rates[f"{backbone} {c.name.removeprefix('train ')}"
                                f"{' compiled' if compiled else ''}"] = c.items / c.median
                del cands
            if "infer" in parts:
                log(f"inference: {tag}")
                icfg = InferConfig(backbone, args.num_classes, args.size, str(device),
                                   args.dtype, args.channels_last, compiled)
                icands = infer_candidates(icfg, throughput_batch=args.throughput_batch)
                time_alternating(icands, device, warmup=args.warmup + 1 + compiled,
                                 iters=args.iters + 1, rounds=args.rounds, log=log)
                emit(f"### Inference (batch 1 latency, batch {args.throughput_batch} "
                     f"throughput): {tag}\n")
                emit(infer_table(icands, args.peak_tflops))
                emit()
                del icands
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if "pipeline" in parts:
        log("input pipeline")
        with tempfile.TemporaryDirectory() as tmp:
            paths = make_jpegs(Path(tmp), args.pipeline_images)
            rates = per_worker_rates(paths, rounds=max(1, args.rounds // 2))
            size_kb = jpeg_size_kb(paths)
            workers = [int(w) for w in args.loader_workers.split(",") if w]
            loader = {w: loader_rate(paths, w, batch=min(32, len(paths))) for w in workers}
        wanted = {k: v for k, v in train_rates.items() if k.split()[1] in ("plain", "cra-smra")}
        emit(f"### Input pipeline: 500x375 q90 JPEGs ({size_kb:.0f} kB), train augmentation "
             "550 -> 448, one worker (1 thread)\n")
        emit(pipeline_table(rates, {f"{k} ({v:.0f} img/s)": v for k, v in wanted.items()}))
        emit()
        if loader:
            emit("DataLoader (pil path, batch 32, persistent workers, 2nd epoch):\n")
            emit(markdown_table(["workers", "img/s", "per worker"],
                                [[w, f"{r:.1f}", f"{r / w:.1f}"] for w, r in loader.items()]))
            emit()
    report = "\n".join(out)
    if args.output is not None:
        args.output.write_text(report + "\n")
    return report


def main(argv: list[str] | None = None) -> None:
    run(argv)


if __name__ == "__main__":
    main()
