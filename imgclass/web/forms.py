"""Multipart/form-data helpers both servers use: the media type, the boundary, and small text fields."""

from __future__ import annotations

import re


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
