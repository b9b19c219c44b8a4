"""What both experiment scripts share: the target service, test images, and output files."""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from PIL import Image

from ..local import LocalCluster, cluster_options
from ..testbed.inventory import balancer_url_from_cluster

DEFAULT_IMAGES = Path(__file__).resolve().parents[3] / "shared" / "images"  # ../shared beside the checkout


def default_images_dir() -> Path:
    env = os.environ.get("IMGCLASS_IMAGES_DIR")
    for candidate in (Path(env) if env else None, Path("../shared/images"), DEFAULT_IMAGES):
        if candidate is not None and candidate.is_dir():
            return candidate
    return Path("../shared/images")


def add_target_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=os.environ.get("IMGCLASS_URL", "http://127.0.0.1:5000"),
                        help="balancer base URL [env IMGCLASS_URL; default http://127.0.0.1:5000]")  # fmt: skip
    parser.add_argument("--cluster-file", default=os.environ.get("IMGCLASS_CLUSTER"),
                        help="cluster.json from 'imgclass testbed hosts': use its balancer [env IMGCLASS_CLUSTER]")  # fmt: skip
    parser.add_argument("--out", default="results", help="folder for CSV, JSON and PNG files [default results]")
    parser.add_argument("--seed", type=int, default=1, help="seed of the arrival process [default 1]")
    parser.add_argument("--max-in-flight", type=int, default=1000, help="requests in flight before dropping")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


@contextmanager
def local_cluster(**cluster: object) -> Iterator[tuple[LocalCluster, str]]:
    """A local cluster (`imgclass up` options from the defaults table), started and always stopped."""
    ns = cluster_options(log_level="WARNING", **cluster)
    running = LocalCluster(ns, echo=False)
    print(f"# starting a local cluster: {ns.servers} {ns.backend} server(s)", file=sys.stderr, flush=True)
    url = running.start()
    try:
        yield running, url
    finally:
        running.stop()


@contextmanager
def target_service(args: argparse.Namespace, local: bool, **cluster: object) -> Iterator[str]:
    """The balancer base URL: a local cluster started (and stopped) here, or the given one."""
    if not local:
        yield balancer_url_from_cluster(args.cluster_file) if args.cluster_file else args.url.rstrip("/")
        return
    with local_cluster(**cluster) as (_, url):
        yield url


def jpeg_of(path: Path, size: int, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.open(path).convert("RGB").resize((size, size), Image.Resampling.BILINEAR).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def multipart(data: bytes, filename: str = "image.jpg", ctype: str = "image/jpeg") -> tuple[bytes, str]:
    boundary = "imgclass-experiment-7d93c1"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{filename}"\r\n'
            f"Content-Type: {ctype}\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, f"multipart/form-data; boundary={boundary}"


def write_json(path: Path, doc: object) -> None:
    path.write_text(json.dumps(doc, indent=1, default=str))
