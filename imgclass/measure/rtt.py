"""The RTT experiment: round-trip time against image size, and accuracy against resolution."""

from __future__ import annotations

import argparse
import csv
import io
import json
import re
import urllib.request
from pathlib import Path
from typing import Any

from PIL import Image

from ..process import terminate_as_interrupt
from . import loadgen, plots
from .experiment import (
    PLOTS_S,
    RUN_OVERHEAD_S,
    add_target_arguments,
    announce,
    cluster_start_s,
    default_images_dir,
    duration_text,
    finished,
    jpeg_of,
    multipart,
    out_dir,
    progress,
    run_info,
    target_service,
    write_json,
)
from .stats import write_rows_csv

PROG = "test_rtt.py"
DEFAULT_SIZES = "16,32,64,96,128,224,2000"
JPEG_QUALITY = 90
# One accuracy request: resize, PNG encoding and a classification (litert, development machine).
ACCURACY_REQUEST_S = 0.1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="RTT against the size of the image sent, and top-1/top-5 accuracy against resolution.",
    )
    add_target_arguments(p)
    p.add_argument("--sizes", default=DEFAULT_SIZES, help=f"square image sides in px [default {DEFAULT_SIZES}]")
    p.add_argument("--image", help="source photo for the RTT runs [default ../shared/images/cat_720p.jpg]")
    p.add_argument("--rate", type=float, default=4.0, help="open-loop requests/s per size [default 4]")
    p.add_argument("--requests", type=int, default=100, help="requests per size [default 100]")
    p.add_argument("--warmup-requests", type=int, default=5, help="first requests per size left out [default 5]")
    p.add_argument("--images-dir", help="labelled photos for the accuracy part [default ../shared/images]")
    p.add_argument("--labels", help="CSV file,index (Keras 0..999) [default: the table in ../shared/README.md]")
    p.add_argument("--no-accuracy", action="store_true", help="skip the accuracy part")
    p.add_argument("--local", type=int, metavar="N", default=0, help="start a local cluster of N servers")
    p.add_argument("--backend", default="litert", help="--local: model backend [default litert]")
    return p


def read_labels(images_dir: Path, labels_csv: str | None) -> dict[str, int]:
    """file name -> Keras class index, from a CSV or the shared README's table."""
    if labels_csv:
        with open(labels_csv, newline="") as fh:
            return {
                row[0]: int(row[1])
                for row in csv.reader(fh)
                if row and not row[0].startswith("#") and row[1].strip().isdigit()
            }
    readme = images_dir.parent / "README.md"
    table = re.findall(r"^\|\s*`([^`]+)`\s*\|[^|]*\|\s*(\d+)\s", readme.read_text(), re.M) if readme.exists() else []
    if not table:
        raise SystemExit(f"no labels: pass --labels FILE.csv (no table found in {readme})")
    return {name: int(index) for name, index in table if (images_dir / name).exists()}


def classify(url: str, data: bytes, filename: str, ctype: str, top: int = 5) -> list[int]:
    body, content_type = multipart(data, filename, ctype)
    request = urllib.request.Request(f"{url}/submit?top={top}", data=body, headers={"Content-Type": content_type})
    with urllib.request.urlopen(request, timeout=60) as response:
        return [p["index"] for p in json.loads(response.read())["predictions"]]


def _png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def accuracy(url: str, images_dir: Path, labels: dict[str, int], sizes: list[int]) -> tuple[list[dict], list[dict]]:
    """Downsample each photo to size x size, upsample back to 224 (as the original study did), classify."""
    detail: list[dict[str, Any]] = []
    for name, label in sorted(labels.items()):
        path = images_dir / name
        full = classify(url, path.read_bytes(), name, "application/octet-stream")
        original = Image.open(path).convert("RGB")
        for size in sizes:
            small = original.resize((size, size), Image.Resampling.BILINEAR)
            back = small.resize((224, 224), Image.Resampling.BILINEAR)
            got = classify(url, _png(back), f"{size}.png", "image/png")  # PNG: no second lossy step
            detail.append({
                "photo": name, "size_px": size, "label": label, "top1": got[0], "full_res_top1": full[0],
                "top1_correct": int(got[0] == label), "top5_correct": int(label in got),
                "agrees_with_full_res": int(got[0] == full[0]),
            })  # fmt: skip
    summary = []
    for size in sizes:
        rows = [d for d in detail if d["size_px"] == size]
        summary.append({
            "size_px": size, "photos": len(rows),
            "top1": sum(r["top1_correct"] for r in rows) / len(rows),
            "top5": sum(r["top5_correct"] for r in rows) / len(rows),
            "agreement": sum(r["agrees_with_full_res"] for r in rows) / len(rows),
        })  # fmt: skip
    return summary, detail


def size_seconds(args: argparse.Namespace) -> float:
    """One size's run: its warm-up and measured requests at --rate, and the tail after them."""
    return (args.warmup_requests + args.requests) / args.rate + RUN_OVERHEAD_S


def accuracy_seconds(sizes: int, photos: int) -> float:
    """Each photo at full resolution and at each size."""
    return photos * (sizes + 1) * ACCURACY_REQUEST_S


def expected_seconds(args: argparse.Namespace, sizes: int, photos: int) -> float:
    """How long test_rtt.py should take: cluster start-up, each size's run, the accuracy requests, the plots."""
    start = cluster_start_s(args.local) if args.local else 0.0
    return start + sizes * size_seconds(args) + accuracy_seconds(sizes, photos) + PLOTS_S


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    terminate_as_interrupt()
    sizes = [int(s) for s in args.sizes.split(",")]
    images_dir = Path(args.images_dir) if args.images_dir else default_images_dir()
    source = Path(args.image) if args.image else images_dir / "cat_720p.jpg"
    # the labels first: a missing table fails now, not after the RTT runs
    labels = {} if args.no_accuracy else read_labels(images_dir, args.labels)
    out = out_dir(args, PROG)
    accuracy_plan = f", then {len(labels)} photos x {len(sizes) + 1} resolutions" if labels else ""
    announce(PROG, out, expected_seconds(args, len(sizes), len(labels)),
             f"{len(sizes)} sizes x {args.warmup_requests + args.requests} requests at {args.rate:g}/s{accuracy_plan}")  # fmt: skip
    rows: list[dict[str, Any]] = []
    info = run_info(PROG, argv, args, image=str(source))
    steps = len(sizes) + (1 if labels else 0)
    with target_service(args, bool(args.local), servers=max(1, args.local), backend=args.backend) as base:
        for k, size in enumerate(sizes, 1):
            left = (len(sizes) - k + 1) * size_seconds(args) + accuracy_seconds(len(sizes), len(labels)) + PLOTS_S
            progress(k, steps, f"{size} px, {duration_text(size_seconds(args))}", left)
            data = jpeg_of(source, size, JPEG_QUALITY)
            body, ctype = multipart(data)
            warmup = args.warmup_requests / args.rate
            # duration-bounded: the schedule then holds exactly `requests` arrivals after the warm-up
            duration = warmup + args.requests / args.rate
            spec = loadgen.LoadSpec(rate=args.rate, duration=duration, warmup=warmup,
                                    max_in_flight=args.max_in_flight, seed=args.seed)  # fmt: skip
            _, summary = loadgen.run(loadgen.Target(f"{base}/submit", body, ctype), spec, not args.quiet, f"{size}px")
            out.mkdir(parents=True, exist_ok=True)  # on demand: a run that never got this far leaves no folder
            row = {"size_px": size, "image_bytes": len(data), "request_bytes": len(body), **summary.flat()}
            rows.append(row)
            lat = summary.latency
            print(f"{size:>5} px  {len(body):>8} B  mean {lat.mean:8.2f} ms (95% CI {lat.mean_ci[0]:.2f}..{lat.mean_ci[1]:.2f})"
                  f"  p50 {lat.p50:8.2f}  p99 {lat.p99:8.2f}  errors {sum(summary.errors.values())}", flush=True)  # fmt: skip
            write_rows_csv(out / "rtt.csv", rows)
        acc_summary: list[dict[str, Any]] = []
        if labels:
            left = accuracy_seconds(len(sizes), len(labels)) + PLOTS_S
            progress(steps, steps, f"accuracy, {len(labels)} photos at {len(sizes) + 1} resolutions", left)
            acc_summary, detail = accuracy(base, images_dir, labels, sizes)
            write_rows_csv(out / "accuracy.csv", acc_summary)
            write_rows_csv(out / "accuracy_detail.csv", detail)
            for a in acc_summary:
                print(f"{a['size_px']:>5} px  top-1 {a['top1']:.2f}  top-5 {a['top5']:.2f}  "
                      f"agrees with full resolution {a['agreement']:.2f}  ({a['photos']} photos)")  # fmt: skip
    write_json(out / "rtt.json", {**info, "rtt": rows, "accuracy": acc_summary})
    for path in plots.rtt_figures(out):
        print(f"wrote {path}")
    finished(out)
    return 0
