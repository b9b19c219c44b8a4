"""Pull the image bytes out of an upload: multipart field `image`, JSON base64, or a raw image body."""

from __future__ import annotations

import base64
import binascii
import json
import re

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from .errors import BadBase64, BadJSON, EmptyBody, MissingField, PayloadTooLarge

FIELD = "image"
FIELD_BYTES = FIELD.encode()


def media_type(content_type: str) -> str:
    """'multipart/form-data' from 'Multipart/Form-Data; boundary=...'."""
    return content_type.partition(";")[0].strip().lower()


_BOUNDARY = re.compile(r'[;\s]boundary=(?:"([^"]*)"|([^;\s]*))', re.IGNORECASE)


def multipart_boundary(content_type: str) -> bytes | None:
    """The boundary parameter of a multipart Content-Type, unquoted; None when absent or empty."""
    match = _BOUNDARY.search(content_type)
    if not match:
        return None
    return (match.group(1) or match.group(2) or "").encode("latin-1") or None


_PART_NAME = re.compile(rb'(?:^|[;\s])name="([^"]*)"', re.IGNORECASE)
MAX_FIELD_VALUE = 64


def form_fields(body: bytes, content_type: str, names: frozenset[str]) -> dict[str, str]:
    """The small text fields `names` of a multipart body, read from its part headers only.

    Walks the parts from delimiter to delimiter: one C-speed search over each part's content,
    the image included, and no copy of it. A value over MAX_FIELD_VALUE bytes is cut there (these
    are parameters, validated by the caller). Malformed bodies yield what was found before the fault.
    """
    if media_type(content_type) != "multipart/form-data":
        return {}
    boundary = multipart_boundary(content_type)
    if not boundary:
        return {}
    delim = b"\r\n--" + boundary
    at = body.find(delim[2:])
    if at < 0:
        return {}
    found: dict[str, str] = {}
    pos = at + len(delim) - 2
    while body[pos : pos + 2] != b"--":
        head_end = body.find(b"\r\n\r\n", pos)
        end = body.find(delim, head_end + 4) if head_end >= 0 else -1
        if end < 0:
            break
        match = _PART_NAME.search(body, pos, head_end)
        if match:
            name = match.group(1).decode("latin-1")
            if name in names and name not in found:
                found[name] = body[head_end + 4 : min(end, head_end + 4 + MAX_FIELD_VALUE)].decode("latin-1").strip()
        pos = end + len(delim)
    return found


def too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"The upload is larger than the {limit / 1e6:g} MB limit; send a smaller image.")


def decode_base64(text: object) -> bytes:
    if not isinstance(text, str):
        raise BadBase64('"image" must be a base64 string.')
    if text.startswith("data:"):  # accept browser data URLs as well as bare base64
        text = text.partition(",")[2]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BadBase64('"image" is not valid base64.') from None


def image_from_json(body: bytes) -> bytes:
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise BadJSON('The body is not valid JSON; send {"image": "<base64>"}.') from None
    if not isinstance(doc, dict) or FIELD not in doc:
        raise MissingField('The JSON body has no "image" field; send {"image": "<base64>"}.')
    data = decode_base64(doc[FIELD])
    if not data:
        raise EmptyBody('"image" is empty.')
    return data


def read_image(body: bytes, content_type: str, limit: int) -> bytes:
    """The uploaded image bytes from a buffered request body and its Content-Type header.

    The front end has already bounded the body; `limit` applies to the image itself, so that a
    base64 or multipart wrapping cannot smuggle in more than --max-upload-mb of image.
    """
    ctype = media_type(content_type)
    if ctype == "multipart/form-data":
        data = image_from_multipart(body, content_type)
    elif not body:
        raise EmptyBody('The request body is empty; send multipart field \'image\' or JSON {"image": "<base64>"}.')
    elif ctype == "application/json":
        data = image_from_json(body)
    elif ctype.startswith("image/") or ctype == "application/octet-stream":
        data = body
    else:
        raise MissingField(
            f'Unsupported Content-Type {ctype or "none"!r}; send multipart field \'image\' or JSON {{"image": "<base64>"}}.'
        )
    if len(data) > limit:
        raise too_large(limit)
    return data


class _ImageField:
    """python-multipart callbacks that keep the first complete part named `image`."""

    def __init__(self) -> None:
        self.field = b""
        self.value = b""
        self.name: bytes | None = None
        self.chunks: list[bytes] = []
        self.found: bytes | None = None

    def callbacks(self) -> dict[str, object]:
        return {
            "on_part_begin": self.on_part_begin, "on_header_field": self.on_header_field,
            "on_header_value": self.on_header_value, "on_header_end": self.on_header_end,
            "on_part_data": self.on_part_data, "on_part_end": self.on_part_end,
        }  # fmt: skip

    def on_part_begin(self) -> None:
        self.name, self.chunks = None, []

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self.field += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self.value += data[start:end]

    def on_header_end(self) -> None:
        if self.field.lower() == b"content-disposition":
            self.name = parse_options_header(self.value)[1].get(b"name")
        self.field, self.value = b"", b""

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self.name == FIELD_BYTES and self.found is None:
            self.chunks.append(data[start:end])

    def on_part_end(self) -> None:
        if self.name == FIELD_BYTES and self.found is None:
            self.found = b"".join(self.chunks)


def image_from_multipart(body: bytes, content_type: str) -> bytes:
    """The bytes of form field `image` in a buffered multipart/form-data body."""
    if not body:
        raise EmptyBody("The request body is empty; send multipart field 'image'.")
    boundary = multipart_boundary(content_type)
    if not boundary:
        raise MissingField("The multipart Content-Type has no boundary; let the client library build the form.")
    scan = _ImageField()
    parser = MultipartParser(boundary, scan.callbacks())  # type: ignore[arg-type]
    try:
        parser.write(body)
        parser.finalize()
    except (MultipartParseError, ValueError) as exc:
        if scan.found is None:
            raise MissingField(f"The multipart body is malformed ({exc}).") from None
    if scan.found is None:
        raise MissingField("The multipart body has no 'image' field; send the file as field 'image'.")
    if not scan.found:
        raise EmptyBody("The 'image' field is empty; choose a file to upload.")
    return scan.found
