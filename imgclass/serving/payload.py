"""Pull the image bytes out of an upload: multipart field `image`, JSON base64, or a raw image body."""

from __future__ import annotations

import base64
import binascii
import json

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from ..errors import BadBase64, BadJSON, EmptyBody, MissingField, UnsupportedContentType
from ..web.app import too_large
from ..web.forms import media_type, multipart_boundary

FIELD = "image"
FIELD_BYTES = FIELD.encode()
# Every accepted form of upload, for the messages that must say what to send instead.
FORMS = (
    "multipart/form-data with the file in field 'image' (curl -F image=@photo.jpg), "
    'JSON {"image": "<base64>"} with Content-Type application/json, '
    "or the raw file with Content-Type image/* or application/octet-stream "
    "(curl -H 'Content-Type: image/jpeg' --data-binary @photo.jpg)"
)


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
        raise EmptyBody(f"The request body is empty; send {FORMS}.")
    elif ctype == "application/json":
        data = image_from_json(body)
    elif not ctype or ctype.startswith("image/") or ctype == "application/octet-stream":
        data = body  # the raw file; with no Content-Type at all, the bytes must speak for themselves
    else:
        raise UnsupportedContentType(f"Content-Type {ctype!r} is not one this API takes; send {FORMS}.")
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
