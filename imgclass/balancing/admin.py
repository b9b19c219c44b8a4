"""Routes about the backends: GET /backends and /labels for anyone, POST and DELETE /backends with the admin token."""

from __future__ import annotations

import asyncio
import hmac
import json
import time

import aiohttp

from .. import config
from ..errors import BadJSON, BadParameter, Forbidden, NoBackendAvailable, Unauthorized
from ..web.app import Request, Response, json_response
from .state import Balancer


def require_admin(balancer: Balancer, request: Request) -> None:
    check_token(balancer.settings.admin_token, request)


def check_token(token: str | None, request: Request) -> None:
    """The admin token's check, shared with engine mode's control plane."""
    if not token:
        raise Forbidden(
            "Membership changes are disabled: start the balancer with --admin-token or IMGCLASS_ADMIN_TOKEN."
        )
    scheme, _, supplied = request.headers.get("authorization", "").strip().partition(" ")
    # The scheme is case-insensitive (RFC 9110 section 11.1); the token is compared in constant time.
    if scheme.lower() != "bearer" or not hmac.compare_digest(supplied.strip().encode(), token.encode()):
        raise Unauthorized("Send 'Authorization: Bearer <admin token>' to change the backends.")


async def list_backends(balancer: Balancer, request: Request) -> Response:
    now = time.monotonic()
    return json_response([b.snapshot(now) for b in balancer.pool.backends])


async def labels(balancer: Balancer, request: Request) -> Response:
    """The model's class list, as a healthy model server gives it (fetched once, then kept)."""
    if balancer.labels is None:
        assert balancer.session is not None
        for backend in balancer.pool.candidates():
            try:
                async with balancer.session.get(backend.url + "/labels") as answer:
                    if answer.status == 200:
                        balancer.labels = await answer.read()
                        break
            except (aiohttp.ClientError, asyncio.TimeoutError):
                continue
        else:
            raise NoBackendAvailable("No healthy model server can list the labels; retry shortly.", retry_after=1)
    return Response(balancer.labels, 200, [(b"content-type", b"application/json")])


def url_to_add(request: Request) -> str:
    """POST /backends's {"url": ...}, checked as --backends checks it (shared with engine mode)."""
    try:
        doc = json.loads(request.body)
        raw = doc["url"]
    except (ValueError, KeyError, TypeError):
        raise BadJSON('Send JSON {"url": "http://host:port"}.') from None
    try:
        return config.url(str(raw))
    except ValueError as exc:
        raise BadParameter(f"{exc}.") from None


def url_to_remove(request: Request) -> str:
    """DELETE /backends?url=... (shared with engine mode)."""
    raw = request.query.get("url")
    if not raw:
        raise BadParameter("Pass the backend to remove as ?url=http://host:port.")
    return raw.rstrip("/")


async def add_backend(balancer: Balancer, request: Request) -> Response:
    require_admin(balancer, request)
    state = await balancer.pool.add(url_to_add(request))
    return json_response(state.snapshot(time.monotonic()), 201)


async def remove_backend(balancer: Balancer, request: Request) -> Response:
    require_admin(balancer, request)
    url = url_to_remove(request)
    balancer.pool.remove(url)
    return json_response({"removed": url})
