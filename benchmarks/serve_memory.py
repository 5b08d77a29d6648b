"""Peak and retained memory of ``crasmra serve`` under a burst of large uploads.

Starts ``crasmra serve`` in a subprocess on a tiny random-init checkpoint (resnet10t, 64 px:
the model's own footprint is small, so the figures are the server's and the images'), fires
``--requests`` concurrent uploads of a solid-colour PNG of ``--megapixels`` (a few hundred KB
that decodes to the full pixel count: the costly case), and reads the server's ``VmHWM`` (peak
resident set) and ``VmRSS`` from ``/proc`` (Linux only): before the burst, right after it and
after ``--settle`` seconds. Several ``--rounds`` show whether memory creeps up.

The budget checked is the server's stated bound (see ``crasmra.serve``): its resident set
when idle, plus ``max_concurrent * (8 bytes * max_pixels + max_upload)`` for the turns of
decoding and inference, plus 1 MiB per waiting upload, plus ``--slack-mb`` for the rest of a
request (the multipart parser, PyTorch's and the renderer's buffers). Exits with status 1 when
the peak exceeds it. ``--mode RGBA`` sends images with alpha, which take three times the
memory per pixel and so several turns each (at 40 MP, more than all of them: 413).

Examples::

    python benchmarks/serve_memory.py
    python benchmarks/serve_memory.py --mode RGBA --megapixels 26
    python benchmarks/serve_memory.py --max-concurrent 4 --requests 60 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import math
import os
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

#: Bytes per decoded RGB pixel at a request's peak (PIL's 4-byte RGBX, twice while the EXIF
#: orientation is applied): what one turn of the server pays for, with the file.
BYTES_PER_PIXEL = 8
MIB = 2**20
BOUNDARY = "crasmra-bench-boundary"
SERVE = "import sys; from crasmra.cli import main; sys.exit(main(sys.argv[1:]))"


def tiny_checkpoint(folder: Path) -> Path:
    """A random-init resnet10t CRA-SMRA network, 4 classes, 64 px, as a safetensors export."""
    from crasmra.checkpoint import build_metadata, save_safetensors
    from crasmra.model import CRASMRANet

    net = CRASMRANet("resnet10t", 4, pretrained=False, head_channels=32, head_hidden=32)
    meta = build_metadata(net.config, ["a", "b", "c", "d"],
                          {"image_size": 64, "resize_size": 72}, net.data_config)
    return Path(save_safetensors(folder / "tiny.safetensors", net.state_dict(), meta))


def solid_png(side: int, mode: str = "RGB") -> bytes:
    """An RGB or RGBA PNG of ``side`` x ``side`` pixels of one colour, compressed row by row."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    colour, colour_type = (bytes((200, 120, 40, 160)), 6) if mode == "RGBA" else \
        (bytes((200, 120, 40)), 2)
    row = b"\0" + colour * side  # filter type 0, then the pixels
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    header = struct.pack(">IIBBBBB", side, side, 8, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat)
            + chunk(b"IEND", b""))


def multipart(data: bytes) -> bytes:
    return (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"image\"; "
            "filename=\"big.png\"\r\nContent-Type: image/png\r\n\r\n").encode() + data + \
        f"\r\n--{BOUNDARY}--\r\n".encode()


def proc_memory_mb(pid: int) -> dict[str, float]:
    """``VmRSS`` and ``VmHWM`` of a process, in MB (10^6 bytes)."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) * 1024 / 1e6
    return values


def start_server(checkpoint: Path, args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    """``crasmra serve`` on a free port; returns the process and its base URL."""
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    cmd = [sys.executable, "-c", SERVE, "serve", str(checkpoint), "--port", "0",
           "--threads", str(args.threads), "--max-concurrent", str(args.max_concurrent),
           "--max-queue", str(args.max_queue), "--max-pixels", str(args.max_pixels),
           "--max-upload-mb", f"{args.max_upload_mb:g}"]
    server = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
    assert server.stderr is not None
    for line in server.stderr:
        if " on http://" in line:
            url = line.split(" on ", 1)[1].split()[0]
            break
    else:
        raise RuntimeError(f"crasmra serve did not start (exit status {server.wait()}).")
    # Keep draining its log so that it never blocks on a full pipe.
    threading.Thread(target=server.stderr.read, daemon=True).start()
    return server, url


def post(url: str, body: bytes) -> tuple[int, str]:
    req = urllib.request.Request(f"{url}/api/predict", data=body, method="POST", headers={
        "Content-Type": f"multipart/form-data; boundary={BOUNDARY}"})
    try:
        with urllib.request.urlopen(req, timeout=600) as response:
            return response.status, ""
    except urllib.error.HTTPError as err:
        return err.code, err.headers.get("Retry-After", "")
    except OSError as err:
        return 0, type(err).__name__


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--megapixels", type=float, default=40.0)
    parser.add_argument("--mode", choices=("RGB", "RGBA"), default="RGB")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--settle", type=float, default=2.0)
    parser.add_argument("--max-concurrent", type=int, default=2)
    parser.add_argument("--max-queue", type=int, default=8)
    parser.add_argument("--max-pixels", type=int, default=40_000_000)
    parser.add_argument("--max-upload-mb", type=float, default=20.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--slack-mb", type=float, default=100.0)
    args = parser.parse_args()
    if not sys.platform.startswith("linux"):
        parser.error("reads /proc/PID/status: Linux only")

    side = math.isqrt(int(args.megapixels * 1e6))
    png = solid_png(side, args.mode)
    body = multipart(png)
    print(f"upload: {side} x {side} = {side * side / 1e6:.1f} MP solid-colour {args.mode} PNG, "
          f"{len(png) / 1e3:.0f} KB; {args.requests} at once, {args.rounds} rounds; "
          f"--max-concurrent {args.max_concurrent} --max-queue {args.max_queue}")
    with tempfile.TemporaryDirectory(prefix="crasmra-serve-bench-") as tmp:
        server, url = start_server(tiny_checkpoint(Path(tmp)), args)
        try:
            idle = proc_memory_mb(server.pid)
            turn_mb = (BYTES_PER_PIXEL * args.max_pixels + args.max_upload_mb * MIB) / 1e6
            stated = args.max_concurrent * turn_mb + args.max_queue * MIB / 1e6
            budget = idle["VmRSS"] + stated + args.slack_mb
            print(f"idle: RSS {idle['VmRSS']:.0f} MB, peak so far {idle['VmHWM']:.0f} MB; budget "
                  f"{budget:.0f} MB = idle + {args.max_concurrent} turns x ({BYTES_PER_PIXEL} B x "
                  f"{args.max_pixels / 1e6:g} MP + {args.max_upload_mb:g} MiB) + "
                  f"{args.max_queue} x 1 MiB + {args.slack_mb:g} MB slack")
            rows = []
            for round_ in range(1, args.rounds + 1):
                start = time.perf_counter()
                with ThreadPoolExecutor(max_workers=args.requests) as pool:
                    answers = list(pool.map(lambda _: post(url, body), range(args.requests)))
                seconds = time.perf_counter() - start
                after = proc_memory_mb(server.pid)
                time.sleep(args.settle)
                settled = proc_memory_mb(server.pid)
                statuses = Counter(status for status, _ in answers)
                retry = sorted({extra for status, extra in answers if status == 503})
                rows.append({"round": round_, "seconds": round(seconds, 1),
                             "statuses": dict(statuses), "retry_after": retry,
                             "peak_mb": round(settled["VmHWM"]),
                             "rss_after_mb": round(after["VmRSS"]),
                             "rss_settled_mb": round(settled["VmRSS"])})
                print(json.dumps(rows[-1]))
        finally:
            server.terminate()
            server.wait(timeout=30)
    peak = max(row["peak_mb"] for row in rows)
    ok = peak <= budget
    print(f"peak RSS {peak} MB {'<=' if ok else '>'} budget {budget:.0f} MB: "
          f"{'within' if ok else 'OVER'} budget; RSS after the last burst "
          f"{rows[-1]['rss_settled_mb']} MB (idle {idle['VmRSS']:.0f} MB)")
    print(f"load average: {' '.join(f'{v:.2f}' for v in os.getloadavg())} on "
          f"{os.cpu_count()} CPUs")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
