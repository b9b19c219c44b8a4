"""What the model server and the balancer share about the two protocols: paths, names, error bodies."""

from __future__ import annotations

import json
from collections.abc import Iterator

from ...errors import ClientGone, NotFound
from ...web.app import App, Handler, Request, Response

# The binary tensor data extension: the JSON header's length when binary tensors follow it. It is
# the only sign of a binary body (tritonclient sends no Content-Type), so it decides, not the type.
INFER_HEADER = "inference-header-content-length"
MODEL_VERSION = "1"  # one model, one version: what Triton and TF Serving call version 1
SERVER_NAME = "imgclass"
EXTENSIONS = ("binary_tensor_data", "classification", "model_configuration", "statistics")

# Open Inference Protocol v2 (KServe v2, Triton, MLServer): every model route in both forms.
OIP_MODEL = ("/v2/models/{model}", "/v2/models/{model}/versions/{version}")
# TF Serving REST
TFS_MODEL = ("/v1/models/{model}", "/v1/models/{model}/versions/{version}")


def model_paths(bases: tuple[str, ...], suffix: str = "") -> Iterator[str]:
    """Each base path with `suffix`, e.g. '/infer' or ':predict'."""
    return (base + suffix for base in bases)


def check_model(request: Request, model_name: str) -> None:
    """The {model} and {version} segments must name what this server serves: else 404, as Triton."""
    model = request.params.get("model", "")
    if model != model_name:
        raise NotFound(f"Unknown model {model!r}; this server serves {model_name!r}.")
    version = request.params.get("version")
    if version is not None and version != MODEL_VERSION:
        raise NotFound(f"Model {model_name!r} has no version {version!r}; it has version {MODEL_VERSION!r}.")


def protocol_error(response: Response) -> Response:
    """An error in these protocols' shape: {"error": "<sentence>"} (both say so), our code beside it."""
    doc = json.loads(response.body)
    response.body = json.dumps({"error": doc["message"], "code": doc["error"]}, separators=(",", ":")).encode()
    return response


def guarded(app: App, handler: Handler) -> Handler:
    """`handler`, with its errors answered in the protocols' shape; the app still logs them, and a
    bug is still one 500 whose details stay in the log."""

    async def run(request: Request) -> Response:
        try:
            return await handler(request)
        except ClientGone:
            raise
        except Exception as exc:
            return protocol_error(app.error(request, exc))

    return run
