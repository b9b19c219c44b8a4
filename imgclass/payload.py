"""Pull the image bytes out of an upload: multipart field `image`, JSON base64, or a raw image body."""

from __future__ import annotations

import base64
import binascii
import json

from aiohttp import web

from .errors import BadBase64, BadJSON, EmptyBody, MissingField, PayloadTooLarge

FIELD = "image"


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


async def read_image(request: web.Request, limit: int) -> bytes:
    """Return the uploaded image bytes, enforcing `limit` even for chunked uploads."""
    if request.content_length is not None and request.content_length > limit:
        raise too_large(limit)
    ctype = request.content_type
    if ctype == "multipart/form-data":
        return await _read_multipart(request, limit)
    try:
        body = await request.read()  # client_max_size is set to `limit`
    except web.HTTPRequestEntityTooLarge:
        raise too_large(limit) from None
    if not body:
        raise EmptyBody('The request body is empty; send multipart field \'image\' or JSON {"image": "<base64>"}.')
    if ctype == "application/json":
        return image_from_json(body)
    if ctype.startswith("image/") or ctype == "application/octet-stream":
        return body
    raise MissingField(
        f'Unsupported Content-Type {ctype or "none"!r}; send multipart field \'image\' or JSON {{"image": "<base64>"}}.'
    )


async def _read_multipart(request: web.Request, limit: int) -> bytes:
    try:
        reader = await request.multipart()
    except (ValueError, AssertionError, KeyError):
        raise MissingField("The multipart body cannot be parsed; check its boundary.") from None
    total = 0
    found: bytes | None = None
    try:
        while (part := await reader.next()) is not None:
            chunks: list[bytes] = []
            while chunk := await part.read_chunk(1 << 16):  # type: ignore[union-attr]
                total += len(chunk)
                if total > limit:
                    raise too_large(limit)
                if found is None and getattr(part, "name", None) == FIELD:
                    chunks.append(chunk)
            if found is None and getattr(part, "name", None) == FIELD:
                found = b"".join(chunks)
    except (ValueError, AssertionError, RuntimeError) as exc:
        if found is None:
            raise MissingField(f"The multipart body is malformed ({exc}).") from None
    if found is None:
        if total == 0:
            raise EmptyBody("The request body is empty; send multipart field 'image'.")
        raise MissingField("The multipart body has no 'image' field; send the file as field 'image'.")
    if not found:
        raise EmptyBody("The 'image' field is empty; choose a file to upload.")
    return found
