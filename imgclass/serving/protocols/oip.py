"""Open Inference Protocol v2 (KServe v2) over REST on the model server: health, metadata, config, stats, infer."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from importlib import metadata

from ...errors import NotReady
from ...web.app import App, Request, Response, json_response
from ..backends import NUM_CLASSES
from .served import Served
from .tensors import INPUT, OUTPUT, encode_infer, parse_infer
from .wire import EXTENSIONS, INFER_HEADER, MODEL_VERSION, OIP_MODEL, SERVER_NAME, guarded, model_paths

try:
    VERSION = metadata.version("imgclass")
except metadata.PackageNotFoundError:  # run from a checkout that was never installed
    VERSION = "0.0.0"

_JSON = [(b"content-type", b"application/json")]
_BINARY = b"application/octet-stream"


async def live(served: Served, request: Request) -> Response:
    return json_response({"live": True})


async def ready(served: Served, request: Request) -> Response:
    if not served.server.ready:
        raise NotReady("The model is not loaded yet, or the server is shutting down; retry shortly.", retry_after=1)
    return json_response({"ready": True})


async def server_metadata(served: Served, request: Request) -> Response:
    return json_response({"name": SERVER_NAME, "version": VERSION, "extensions": list(EXTENSIONS)})


async def model_metadata(served: Served, request: Request) -> Response:
    served.check(request, ready=False)
    return json_response({
        "name": served.name,
        "versions": [MODEL_VERSION],
        "platform": f"imgclass_{served.server.settings.backend}",
        # -1: the batch dimension, as Triton writes it for a model with max_batch_size > 0
        "inputs": [{"name": INPUT, "datatype": "BYTES", "shape": [-1, 1]}],
        "outputs": [{"name": OUTPUT, "datatype": "FP32", "shape": [-1, NUM_CLASSES]}],
    })  # fmt: skip


async def model_ready(served: Served, request: Request) -> Response:
    served.check(request)
    return json_response({"name": served.name, "ready": True})


def model_config(served: Served) -> dict[str, object]:
    """Triton's model configuration, as far as it describes this server: perf_analyzer reads the
    batch size, the tensors and the scheduler from it."""
    server = served.server
    batcher = server.batcher
    return {
        "name": served.name,
        "platform": f"imgclass_{server.settings.backend}",
        "backend": server.settings.backend,
        "version_policy": {"latest": {"num_versions": 1}},
        "max_batch_size": served.limits.max_batch,
        "input": [{"name": INPUT, "data_type": "TYPE_STRING", "format": "FORMAT_NONE", "dims": [1],
                   "is_shape_tensor": False, "allow_ragged_batch": False, "optional": False}],
        "output": [{"name": OUTPUT, "data_type": "TYPE_FP32", "dims": [NUM_CLASSES], "label_filename": "labels",
                    "is_shape_tensor": False}],
        "dynamic_batching": {
            "preferred_batch_size": [batcher.max_batch],
            "max_queue_delay_microseconds": round(batcher.batch_timeout_s * 1e6),
            "default_queue_policy": {"max_queue_size": batcher.max_queue,
                                     "default_timeout_microseconds": round(batcher.max_wait_s * 1e6)},
        },
        "instance_group": [{"name": f"{served.name}_0", "kind": "KIND_CPU", "count": server.threads}],
        "parameters": {"model": {"string_value": server.backend.model_name}},
        "model_transaction_policy": {"decoupled": False},
    }  # fmt: skip


async def config(served: Served, request: Request) -> Response:
    served.check(request, ready=False)
    return json_response(model_config(served))


async def model_stats(served: Served, request: Request) -> Response:
    served.check(request, ready=False)
    return json_response({"model_stats": [served.stats.to_json(served.name, MODEL_VERSION)]})


async def all_stats(served: Served, request: Request) -> Response:
    return json_response({"model_stats": [served.stats.to_json(served.name, MODEL_VERSION)]})


async def infer(served: Served, request: Request) -> Response:
    served.check(request)
    parsed = parse_infer(request.body, request.headers.get(INFER_HEADER), served.limits)
    results = await served.classify(parsed.images, parsed.top)
    body, header_length = encode_infer(served.name, parsed, results, served.labels)
    headers = [(b"x-served-by", served.server.name.encode("latin-1"))]
    if header_length is None:
        return Response(body, 200, [*_JSON, *headers])
    headers += [(b"content-type", _BINARY), (INFER_HEADER.encode(), b"%d" % header_length)]
    return Response(body, 200, headers)


Route = Callable[[Served, Request], Awaitable[Response]]


def add_routes(app: App, served: Served) -> None:
    def add(method: str, path: str, handler: Route, **options: float) -> None:
        app.route(method, path, guarded(app, functools.partial(handler, served)), **options)  # type: ignore[arg-type]

    add("GET", "/v2/health/live", live)
    add("GET", "/v2/health/ready", ready)
    add("GET", "/v2", server_metadata)
    add("GET", "/v2/models/stats", all_stats)  # exact routes win over /v2/models/{model}
    for base in OIP_MODEL:
        add("GET", base, model_metadata)
    for path in model_paths(OIP_MODEL, "/ready"):
        add("GET", path, model_ready)
    for path in model_paths(OIP_MODEL, "/config"):
        add("GET", path, config)
    for path in model_paths(OIP_MODEL, "/stats"):
        add("GET", path, model_stats)
    for path in model_paths(OIP_MODEL, "/infer"):
        # As /predict: a client that leaves drops its images from the queue.
        add("POST", path, infer, watch=0.0)
