"""One forwarded request, from choosing a backend to the annotated answer, with one retry elsewhere."""

from __future__ import annotations

import asyncio
import functools
import json
import time
from urllib.parse import urlencode

import aiohttp
from yarl import URL

from .. import log
from ..errors import BadParameter, NoBackendAvailable, UpstreamError, UpstreamTimeout
from ..web.app import Request, Response
from ..web.forms import form_fields
from .policies import POLICIES
from .pool import BackendState
from .state import Balancer

OPTIONS = frozenset({"policy", "number_backend_servers"})  # ours: never passed on to the model server
_ON_ERRORS = frozenset({b"retry-after", b"allow"})  # an error's headers that the client gets too
# The Open Inference Protocol's binary tensor data extension: where the JSON header of a body ends.
INFER_HEADER = "Inference-Header-Content-Length"


class UpstreamFailure(Exception):
    """The backend gave no usable response, so it cannot have answered: `kind` says how far it got.

    connect: no connection, the request never left. closed: the connection closed before any byte
    of a response. cut_short: it closed mid-response. bad_response: the bytes were not HTTP.
    """

    def __init__(self, reason: str, *, kind: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.kind = kind


class ReadTimeout(Exception):
    """The backend accepted the request but did not answer within --timeout."""


@functools.lru_cache(maxsize=4096)
def _url(base: str, path: str) -> URL:
    # Parsing and normalising a URL string is a visible share of aiohttp's per-request cost.
    return URL(base + path, encoded=True)


async def post(
    session: aiohttp.ClientSession, url: URL, body: bytes, headers: dict[str, str]
) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """POST to a backend: (status, the headers the client gets too, body), or UpstreamFailure / ReadTimeout.

    The session's timeout applies: --connect-timeout to connect, --timeout as the longest silence.
    """
    try:
        async with session.post(url, data=body, headers=headers, allow_redirects=False) as answer:
            payload = await answer.read()
            status = answer.status
            # What the body is, and what an error asks of the client; the rest describe the
            # backend's connection, or we set them ourselves.
            passed = [(b"content-type", answer.headers.get("Content-Type", "application/json").encode("latin-1"))]
            if (header_length := answer.headers.get(INFER_HEADER)) is not None:
                passed.append((b"inference-header-content-length", header_length.encode("latin-1")))
            if status >= 400:
                passed += [(k.lower(), v) for k, v in answer.raw_headers if k.lower() in _ON_ERRORS]
            return status, passed, payload
    except aiohttp.ConnectionTimeoutError:
        raise UpstreamFailure("connect failed: connect timed out", kind="connect") from None
    except (aiohttp.ServerTimeoutError, asyncio.TimeoutError):
        raise ReadTimeout() from None
    except aiohttp.ClientConnectorError as exc:
        raise UpstreamFailure(f"connect failed: {exc.os_error.strerror or exc}", kind="connect") from None
    except aiohttp.ServerDisconnectedError:
        raise UpstreamFailure("connection closed before a response", kind="closed") from None
    except aiohttp.ClientPayloadError:
        raise UpstreamFailure("response cut short", kind="cut_short") from None
    except aiohttp.ClientResponseError as exc:
        raise UpstreamFailure(f"bad response: {exc.message}", kind="bad_response") from None
    except aiohttp.ClientOSError as exc:
        raise UpstreamFailure(f"connection failed: {exc.strerror or exc}", kind="closed") from None


def request_options(balancer: Balancer, request: Request) -> tuple[str, int | None]:
    """policy and number_backend_servers, from the query or a multipart form field."""
    query = request.query if request.query_string else {}
    values = {k: query[k] for k in OPTIONS if k in query}
    if len(values) < 2:
        for name, value in form_fields(request.body, request.content_type, OPTIONS).items():
            values.setdefault(name, value)
    policy = values.get("policy", balancer.settings.policy)
    if policy not in POLICIES:
        raise BadParameter(f"policy must be one of {', '.join(POLICIES)}, not {policy!r}.")
    first_k = None
    if "number_backend_servers" in values:
        raw = values["number_backend_servers"]
        count = len(balancer.pool.backends)
        if not raw.isdigit() or not 1 <= int(raw) <= count:
            raise BadParameter(
                f"number_backend_servers must be a whole number from 1 to {count} (the backends this balancer has), "
                f"not {raw!r}."
            )
        first_k = int(raw)
    return policy, first_k


class Forward:
    """One forwarded request: choose a backend (or wait for one), send, retry once if nothing came back."""

    __slots__ = (
        "annotate", "backend", "balancer", "first_k", "headers", "path", "policy", "queued_ms", "request", "start",
    )  # fmt: skip

    def __init__(self, balancer: Balancer, request: Request, path: str = "/predict", annotate: bool = True) -> None:
        self.start = time.perf_counter()
        self.annotate = annotate  # splice our timings into the answer; False passes it through untouched
        self.balancer = balancer
        self.request = request
        self.policy, self.first_k = request_options(balancer, request)
        # Our own parameters stay here; anything else (e.g. top=) goes to the model server.
        if request.query_string:
            passthrough = [(k, v) for k, v in request.query.items() if k not in OPTIONS]
            if passthrough:
                path += "?" + urlencode(passthrough)
        self.path = path
        self.headers = {
            "Content-Type": request.content_type or "application/octet-stream",
            log.REQUEST_ID_HEADER: request.id,
        }
        self.queued_ms = 0.0
        self.backend: BackendState | None = None

    async def run(self) -> Response:
        balancer = self.balancer
        balancer.active += 1
        try:
            backend = balancer.take_now(self.policy, self.first_k)
            if backend is None:
                backend, self.queued_ms = await balancer.acquire(self.policy, self.first_k)
            return await self._try(backend, first=True)
        except asyncio.CancelledError:
            # The client left (or the server is stopping): the queue place or the slot is already
            # given back by acquire() and _try(); the model server sees its connection close.
            balancer.client_gone.labels("forwarding" if self.backend is not None else "queued").inc()
            raise
        finally:
            balancer.active -= 1

    async def _try(self, backend: BackendState, first: bool) -> Response:
        """One try on `backend`, holding its slot; the first may be retried once on another backend."""
        balancer = self.balancer
        assert balancer.session is not None
        self.backend = backend
        sent = time.perf_counter()
        try:
            send = post(balancer.session, _url(backend.url, self.path), self.request.body, self.headers)
            try_timeout = balancer.settings.try_timeout
            status, headers, body = await (asyncio.wait_for(send, try_timeout) if try_timeout else send)
        except UpstreamFailure as exc:
            # Nothing came back, so the backend cannot have answered; classification is idempotent,
            # so one retry elsewhere is safe (HAProxy's retry-on conn-failure empty-response).
            self._failed(backend, exc.reason, connection=True, count_as="error")
            if not first:
                raise UpstreamError(f"Two model servers failed to answer ({exc.reason}); retry shortly.") from None
            return await self._retry(backend, "no_response", exc.reason)
        except ReadTimeout:
            self._failed(backend, "timeout", connection=False, count_as="timeout")
            raise UpstreamTimeout(f"The model server did not answer within {balancer.settings.timeout:g} s.") from None
        except (TimeoutError, asyncio.TimeoutError):  # --try-timeout: this try took too long
            self._failed(backend, "try_timeout", connection=False, count_as="timeout")
            if first and balancer.may_retry("try_timeout"):
                return await self._retry(backend, "try_timeout", f"no answer within {balancer.settings.try_timeout:g} s")
            raise UpstreamTimeout(
                f"The model server did not answer within the {balancer.settings.try_timeout:g} s try timeout."
            ) from None
        finally:
            balancer.slots.release(backend)
        upstream_ms = (time.perf_counter() - sent) * 1000
        if status == 503 and first:
            # The server shed the request without processing it: back-pressure, not a failure. It is
            # retried once on a server with a slot free now, within the retry budget; otherwise the
            # client gets the 503 and its Retry-After.
            try:
                other = balancer.slots.take_now(balancer.policies[self.policy], self.first_k, exclude=backend)
            except NoBackendAvailable:
                other = None
            if other is not None:
                if balancer.may_retry("overloaded"):
                    balancer.count(backend.url, status)
                    return await self._retry(backend, "overloaded", "503 from the server", other)
                balancer.slots.release(other)
        return self._finish(backend, status, headers, body, upstream_ms)

    async def _retry(
        self, failed: BackendState, reason: str, detail: str, backend: BackendState | None = None
    ) -> Response:
        balancer = self.balancer
        balancer.retries.inc(reason)
        budgeted = reason != "no_response"  # a dead server adds no load: its retries are not budgeted
        if budgeted:
            balancer.retrying += 1
            balancer.retrying_peak = max(balancer.retrying_peak, balancer.retrying)
        try:
            if backend is None:
                backend, waited = await balancer.acquire(self.policy, self.first_k, exclude=failed)
                self.queued_ms += waited
            balancer.logger.warning("retry", failed=failed.url, reason=reason, detail=detail, to=backend.url)
            return await self._try(backend, first=False)
        finally:
            if budgeted:
                balancer.retrying -= 1

    def _failed(self, backend: BackendState, reason: str, *, connection: bool, count_as: str) -> None:
        self.balancer.pool.record_failure(backend, reason, connection=connection)
        self.balancer.count(backend.url, count_as)

    def _finish(
        self, backend: BackendState, status: int, headers: list[tuple[bytes, bytes]], body: bytes, upstream_ms: float
    ) -> Response:
        balancer = self.balancer
        balancer.count(backend.url, status)
        if status == 503:
            pass  # shedding (overloaded, not ready): back-pressure, never a failure (nginx, HAProxy)
        elif status >= 500:
            balancer.pool.record_failure(backend, f"http_{status}", connection=False)
        else:
            balancer.pool.record_success(backend, upstream_ms)
        headers.append((b"x-backend", backend.url.encode()))
        total = time.perf_counter() - self.start
        if status == 200 and self.annotate:
            body = annotate(body, backend.url, upstream_ms, self.queued_ms, total * 1000)
        balancer.latency.observe(total)
        return Response(body, status, headers)


@functools.lru_cache(maxsize=1024)
def _backend_member(backend_url: str) -> bytes:
    return b',"backend":' + json.dumps(backend_url).encode() + b"}"


def annotate(payload: bytes, backend_url: str, upstream_ms: float, queued_ms: float, total_ms: float) -> bytes:
    """Add backend and timing_ms.{upstream,queued,balancer} to the server's JSON answer.

    balancer is all the time spent at the balancer outside the upstream call; queued is the part
    of it spent waiting for a free slot (0 without --max-conn).
    """
    balancer_ms = total_ms - upstream_ms
    extra = f'"upstream":{upstream_ms:.3f},"queued":{queued_ms:.3f},"balancer":{balancer_ms:.3f},'.encode()
    at = payload.find(b'"timing_ms":{')
    # Our model server's answer is compact JSON ending in '}': splice instead of a parse and re-encode.
    if at >= 0 and payload.endswith(b"}") and payload[at + 13 : at + 14] == b'"':
        cut = at + 13
        return b"".join((payload[:cut], extra, payload[cut:-1], _backend_member(backend_url)))
    doc = json.loads(payload)
    doc["backend"] = backend_url
    timing = doc.setdefault("timing_ms", {})
    timing["upstream"] = round(upstream_ms, 3)
    timing["queued"] = round(queued_ms, 3)
    timing["balancer"] = round(balancer_ms, 3)
    return json.dumps(doc, separators=(",", ":")).encode()
