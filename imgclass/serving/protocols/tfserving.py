"""TF Serving's REST API on the model server: model status, metadata, and :predict with base64 images."""

from __future__ import annotations

import functools
import json
from collections.abc import Awaitable, Callable

from ...errors import BadJSON, BadParameter, EmptyBody, MissingField
from ...web.app import App, Request, Response, json_response, too_large
from ..batching import Result
from ..payload import decode_base64
from .served import Served
from .wire import MODEL_VERSION, TFS_MODEL, guarded, model_paths

DEFAULT_TOP = 5
MAX_TOP = 20  # as /predict's ?top=
SIGNATURE = "serving_default"
INPUT = "image_bytes"  # TF Serving's name for an encoded-image input ({"b64": ...} in JSON)
FORM = '{"instances": [{"b64": "<base64 of the image file>"}]}'


async def status(served: Served, request: Request) -> Response:
    served.check(request, ready=False)
    state = "AVAILABLE" if served.server.ready else "LOADING"
    return json_response({"model_version_status": [
        {"version": MODEL_VERSION, "state": state, "status": {"error_code": "OK", "error_message": ""}},
    ]})  # fmt: skip


def _dims(*sizes: int) -> dict[str, object]:
    return {"dim": [{"size": str(size), "name": ""} for size in sizes], "unknown_rank": False}


async def model_metadata(served: Served, request: Request) -> Response:
    served.check(request, ready=False)
    signature = {
        "inputs": {INPUT: {"dtype": "DT_STRING", "tensor_shape": _dims(-1), "name": f"{INPUT}:0"}},
        "outputs": {
            "classes": {"dtype": "DT_INT64", "tensor_shape": _dims(-1, -1), "name": "classes:0"},
            "scores": {"dtype": "DT_FLOAT", "tensor_shape": _dims(-1, -1), "name": "scores:0"},
            "labels": {"dtype": "DT_STRING", "tensor_shape": _dims(-1, -1), "name": "labels:0"},
        },
        "method_name": "tensorflow/serving/predict",
    }
    return json_response({
        "model_spec": {"name": served.name, "signature_name": "", "version": MODEL_VERSION},
        "metadata": {"signature_def": {"signature_def": {SIGNATURE: signature}}},
    })  # fmt: skip


def _image(value: object, index: int) -> bytes:
    """One instance: {"b64": ...}, or {"<input name>": {"b64": ...}} as TF Serving names inputs."""
    if isinstance(value, dict) and len(value) == 1 and "b64" not in value:
        value = next(iter(value.values()))
    if not isinstance(value, dict) or "b64" not in value:
        raise BadParameter(f'Instance {index + 1} is not {{"b64": "..."}}; send {FORM}.')
    data = decode_base64(value["b64"])
    if not data:
        raise EmptyBody(f"Instance {index + 1} is empty.")
    return data


def parse_predict(body: bytes, max_batch: int, max_image: int) -> tuple[list[bytes], bool]:
    """(images, columnar): the row format ("instances") or the columnar one ("inputs")."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise BadJSON(f"The body is not valid JSON; send {FORM}.") from None
    if not isinstance(doc, dict) or ("instances" not in doc and "inputs" not in doc):
        raise MissingField(f'The body has no "instances" (or "inputs"); send {FORM}.')
    columnar = "instances" not in doc
    items = doc["inputs"] if columnar else doc["instances"]
    if columnar and isinstance(items, dict) and len(items) == 1 and "b64" not in items:
        items = next(iter(items.values()))  # {"inputs": {"image_bytes": [...]}}
    if not isinstance(items, list):
        items = [items]
    if not items:
        raise MissingField(f"There are no instances; send {FORM}.")
    if len(items) > max_batch:
        raise BadParameter(f"{len(items)} instances are more than this server takes at once ({max_batch}); split them.")
    images = [_image(item, i) for i, item in enumerate(items)]
    if any(len(image) > max_image for image in images):
        raise too_large(max_image)
    return images, columnar


def _top(request: Request) -> int:
    raw = request.query.get("top", str(DEFAULT_TOP))
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_TOP:
        raise BadParameter(f"top must be a whole number from 1 to {MAX_TOP}, not {raw!r}.")
    return int(raw)


def prediction(result: Result, labels: list[str]) -> dict[str, list[object]]:
    return {
        "classes": [i for i, _ in result.classes],
        "scores": [round(p, 6) for _, p in result.classes],
        "labels": [labels[i] for i, _ in result.classes],
    }


async def predict(served: Served, request: Request) -> Response:
    served.check(request)
    top = _top(request)
    limits = served.limits
    images, columnar = parse_predict(request.body, limits.max_batch, limits.max_image)
    results = await served.classify(images, top)
    rows = [prediction(r, served.labels) for r in results]
    if columnar:
        return json_response({"outputs": {key: [row[key] for row in rows] for key in ("classes", "scores", "labels")}})
    return json_response({"predictions": rows}, headers={"X-Served-By": served.server.name})


Route = Callable[[Served, Request], Awaitable[Response]]


def add_routes(app: App, served: Served) -> None:
    def add(method: str, path: str, handler: Route, **options: float) -> None:
        app.route(method, path, guarded(app, functools.partial(handler, served)), **options)  # type: ignore[arg-type]

    for base in TFS_MODEL:
        add("GET", base, status)
    for path in model_paths(TFS_MODEL, "/metadata"):
        add("GET", path, model_metadata)
    for path in model_paths(TFS_MODEL, ":predict"):
        add("POST", path, predict, watch=0.0)
