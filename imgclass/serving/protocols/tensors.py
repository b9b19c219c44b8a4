"""Open Inference Protocol v2 tensors: an infer request's images in, probabilities or classes out, JSON or binary."""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ...errors import BadJSON, BadParameter, EmptyBody, MissingField
from ...web.app import too_large
from ..backends import NUM_CLASSES
from ..batching import Result
from ..payload import decode_base64
from .wire import MODEL_VERSION

INPUT = "image"
OUTPUT = "probs"
_LENGTH = struct.Struct("<I")  # a BYTES element's length prefix, little-endian uint32, as Triton's


@dataclass(frozen=True)
class RequestedOutput:
    """One entry of the request's "outputs": binary or JSON, the tensor or its top-k classes."""

    name: str
    binary: bool
    classification: int = 0  # k of the classification extension; 0 for the FP32 tensor itself


@dataclass(frozen=True)
class InferRequest:
    """A parsed infer request: B encoded images and what to answer with."""

    id: str | None
    images: list[bytes]
    outputs: tuple[RequestedOutput, ...]

    @property
    def top(self) -> int:
        """How many classes each image's job must return: all of them for the tensor itself."""
        if any(out.classification == 0 for out in self.outputs):
            return NUM_CLASSES
        return max(out.classification for out in self.outputs)


@dataclass(frozen=True)
class Limits:
    max_batch: int  # images in one request
    max_image: int  # bytes of one encoded image (--max-upload-mb)


# --- BYTES tensors ----------------------------------------------------------------------------


def split_bytes(raw: bytes | memoryview) -> list[bytes]:
    """The elements of a binary BYTES tensor: each a 4-byte length, then that many bytes."""
    out: list[bytes] = []
    pos, end = 0, len(raw)
    while pos < end:
        if pos + 4 > end:
            raise BadParameter("A BYTES element's 4-byte length prefix is cut short; serialize each image as "
                               "<uint32 little-endian length><bytes>, as tritonclient does.")  # fmt: skip
        (size,) = _LENGTH.unpack_from(raw, pos)
        pos += 4
        if pos + size > end:
            raise BadParameter(f"A BYTES element says {size} bytes but only {end - pos} follow; send whole elements.")
        out.append(bytes(raw[pos : pos + size]))
        pos += size
    return out


def join_bytes(items: Sequence[bytes]) -> bytes:
    return b"".join(_LENGTH.pack(len(item)) + item for item in items)


# --- requests ---------------------------------------------------------------------------------


def _header(body: bytes, header_length: str | None) -> tuple[bytes, memoryview]:
    """(JSON header, binary rest) of a body; without the extension's header, all of it is JSON."""
    if header_length is None:
        return body, memoryview(b"")
    if not header_length.strip().isdigit():
        raise BadParameter(f"Inference-Header-Content-Length must be a whole number of bytes, not {header_length!r}.")
    size = int(header_length)
    if size > len(body):
        raise BadParameter(
            f"Inference-Header-Content-Length says the JSON header is {size} bytes, but the body has only "
            f"{len(body)}; send the header's length in bytes."
        )
    view = memoryview(body)
    return bytes(view[:size]), view[size:]


def _object(value: object, what: str) -> dict[str, object]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadParameter(f"{what} must be a JSON object.")
    return value


def _shape(tensor: dict[str, object], limits: Limits) -> int:
    """B from the shape [B, 1] of the image input."""
    shape = tensor.get("shape")
    ok = (
        isinstance(shape, list) and len(shape) == 2 and shape[1] == 1
        and all(isinstance(d, int) and not isinstance(d, bool) for d in shape) and shape[0] >= 1
    )  # fmt: skip
    if not ok:
        raise BadParameter(f"Input {INPUT!r} has shape {shape!r}; send [B, 1]: B encoded images, one per row.")
    batch = int(shape[0])  # type: ignore[index]
    if batch > limits.max_batch:
        raise BadParameter(f"A batch of {batch} images is more than this server's max_batch_size {limits.max_batch}; "
                           "split it.")  # fmt: skip
    return batch


def _json_elements(data: object) -> list[str]:
    """JSON tensor data, flat or nested by row ([[s], [s]]), as a flat list of strings."""
    if not isinstance(data, list):
        raise BadParameter(f'Input {INPUT!r} has no "data" list and no binary_data_size; send one of them.')
    flat: list[object] = []
    for item in data:
        flat.extend(item if isinstance(item, list) else [item])
    if not all(isinstance(item, str) for item in flat):
        raise BadParameter(f'Input {INPUT!r} holds JSON values that are not strings; send base64 strings with '
                           '"parameters": {"content_type": "base64"}, or binary data.')  # fmt: skip
    return flat  # type: ignore[return-value]


def _images(tensor: dict[str, object], binary: memoryview, limits: Limits) -> tuple[list[bytes], int]:
    """The encoded images of the input, and how many binary bytes it took."""
    batch = _shape(tensor, limits)
    if tensor.get("datatype") != "BYTES":
        raise BadParameter(f"Input {INPUT!r} has datatype {tensor.get('datatype')!r}; send BYTES (the encoded files).")
    params = _object(tensor.get("parameters"), f"Input {INPUT!r}'s parameters")
    base64 = params.get("content_type") == "base64"
    size = params.get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= len(binary):
            raise BadParameter(f"binary_data_size {size!r} does not fit the {len(binary)} binary bytes that follow "
                               "the JSON header.")  # fmt: skip
        raw: list[bytes] = split_bytes(binary[:size])
        used = size
        if base64:
            raw = [decode_base64(item.decode("latin-1")) for item in raw]
    else:
        # JSON cannot carry a raw image file, so a JSON string is its base64, marked as MLServer
        # marks it ("content_type": "base64") or not (tritonclient has no way to mark an input).
        raw = [decode_base64(item) for item in _json_elements(tensor.get("data"))]
        used = 0
    if len(raw) != batch:
        raise BadParameter(f"Input {INPUT!r} has shape [{batch}, 1] but holds {len(raw)} images; make them agree.")
    for i, image in enumerate(raw):
        if not image:
            raise EmptyBody(f"Image {i + 1} of {batch} is empty.")
        if len(image) > limits.max_image:
            raise too_large(limits.max_image)
    return raw, used


def _outputs(doc: dict[str, object]) -> tuple[RequestedOutput, ...]:
    binary_default = bool(_object(doc.get("parameters"), "The request's parameters").get("binary_data_output", False))
    requested = doc.get("outputs")
    if not requested:
        return (RequestedOutput(OUTPUT, binary_default),)
    if not isinstance(requested, list):
        raise BadParameter('"outputs" must be a list of {"name": ...} objects.')
    out = []
    for item in requested:
        entry = _object(item, "Each requested output")
        if entry.get("name") != OUTPUT:
            raise BadParameter(f"Unknown output {entry.get('name')!r}; the model has one output, {OUTPUT!r}.")
        params = _object(entry.get("parameters"), f"Output {OUTPUT!r}'s parameters")
        k = params.get("classification", 0)
        if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= NUM_CLASSES:
            raise BadParameter(f"classification must be a whole number from 1 to {NUM_CLASSES}, not {k!r}.")
        out.append(RequestedOutput(OUTPUT, bool(params.get("binary_data", binary_default)), k))
    return tuple(out)


def parse_infer(body: bytes, header_length: str | None, limits: Limits) -> InferRequest:
    """An infer request from its body and its Inference-Header-Content-Length (None without one)."""
    if not body:
        raise EmptyBody('The request body is empty; send {"inputs": [{"name": "image", ...}]}.')
    header, binary = _header(body, header_length)
    try:
        doc = json.loads(header)
    except (ValueError, UnicodeDecodeError):
        raise BadJSON("The inference request header is not valid JSON.") from None
    if not isinstance(doc, dict):
        raise BadJSON('The inference request must be a JSON object with "inputs".')
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise MissingField(f'The request has no "inputs"; send one BYTES input {INPUT!r} of shape [B, 1].')
    tensors = [_object(t, "Each input") for t in inputs]
    names = [t.get("name") for t in tensors]
    unknown = [n for n in names if n != INPUT]
    if unknown:
        raise BadParameter(f"Unknown input {unknown[0]!r}; the model takes one input, {INPUT!r}.")
    if len(names) > 1:
        raise BadParameter(f"Input {INPUT!r} is given {len(names)} times; send it once.")
    images, used = _images(tensors[0], binary, limits)
    if used != len(binary):
        raise BadParameter(f"{len(binary) - used} binary bytes follow the tensors the header describes; "
                           "check binary_data_size and Inference-Header-Content-Length.")  # fmt: skip
    request_id = doc.get("id")
    return InferRequest(request_id if isinstance(request_id, str) else None, images, _outputs(doc))


# --- responses --------------------------------------------------------------------------------


def probabilities(result: Result) -> np.ndarray:
    """The (1000,) float32 vector back from a job that asked for every class."""
    pairs = np.array(result.classes, dtype=np.float64)
    vector = np.zeros(NUM_CLASSES, np.float32)
    vector[pairs[:, 0].astype(np.intp)] = pairs[:, 1]
    return vector


def classes(result: Result, k: int, labels: Sequence[str]) -> list[bytes]:
    """Triton's classification strings, 'score:index:label', best first (score as C's %f)."""
    return [f"{p:f}:{i}:{labels[i]}".encode() for i, p in result.classes[:k]]


def encode_infer(
    model: str, request: InferRequest, results: Sequence[Result], labels: Sequence[str]
) -> tuple[bytes, int | None]:
    """(body, JSON header length or None): the response, with binary tensors after the JSON header."""
    batch = len(results)
    outputs: list[dict[str, object]] = []
    buffers: list[bytes] = []
    for wanted in request.outputs:
        entry: dict[str, object]
        if wanted.classification:
            k = min(wanted.classification, min(len(r.classes) for r in results))
            rows = [s for r in results for s in classes(r, k, labels)]
            entry = {"name": wanted.name, "datatype": "BYTES", "shape": [batch, k]}
            if wanted.binary:
                raw = join_bytes(rows)
            else:
                entry["data"] = [s.decode() for s in rows]
        else:
            matrix = np.stack([probabilities(r) for r in results])
            entry = {"name": wanted.name, "datatype": "FP32", "shape": [batch, NUM_CLASSES]}
            if wanted.binary:
                raw = matrix.astype("<f4").tobytes()
            else:
                entry["data"] = matrix.ravel().tolist()
        if wanted.binary:
            entry["parameters"] = {"binary_data_size": len(raw)}
            buffers.append(raw)
        outputs.append(entry)
    doc: dict[str, object] = {"model_name": model, "model_version": MODEL_VERSION}
    if request.id is not None:
        doc["id"] = request.id
    doc["outputs"] = outputs
    header = json.dumps(doc, separators=(",", ":")).encode()
    if not buffers:
        return header, None
    return b"".join([header, *buffers]), len(header)
