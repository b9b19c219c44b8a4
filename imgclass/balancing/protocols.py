"""The two protocols through the balancer: infer and :predict forwarded as /submit is, the rest answered from the backends."""

from __future__ import annotations

import asyncio
import copy
import functools
import json
from collections.abc import Awaitable, Callable

import aiohttp

from ..errors import NoBackendAvailable, NotFound
from ..serving.protocols.wire import OIP_MODEL, TFS_MODEL, guarded, model_paths
from ..web.app import App, Request, Response, json_response
from .forward import INFER_HEADER, Forward
from .pool import BackendState
from .state import Balancer

_JSON = [(b"content-type", b"application/json")]


async def forward(balancer: Balancer, request: Request) -> Response:
    """The body goes, untouched, to one model server chosen by the policy, with /submit's slots,
    queue and retries; its answer comes back untouched too (no timings spliced into it)."""
    call = Forward(balancer, request, request.path, annotate=False)
    header_length = request.headers.get(INFER_HEADER.lower())
    if header_length is not None:
        call.headers[INFER_HEADER] = header_length
    return await call.run()


async def _get(balancer: Balancer, backend: BackendState, path: str) -> tuple[int, bytes] | None:
    """GET `path` from one backend within the health check's timeout; None if it gave no answer."""
    assert balancer.session is not None
    timeout = aiohttp.ClientTimeout(total=balancer.pool.settings.check_timeout)
    try:
        async with balancer.session.get(backend.url + path, timeout=timeout) as answer:
            return answer.status, await answer.read()
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
        return None


async def from_backends(balancer: Balancer, request: Request) -> Response:
    """The first answer, other than a 5xx, that a healthy backend gives to the same GET: the model
    servers behind one balancer serve the same model, so any one of them speaks for all."""
    for backend in balancer.pool.candidates():
        got = await _get(balancer, backend, request.path)
        if got is not None and got[0] < 500:
            return Response(got[1], got[0], list(_JSON))
    raise NoBackendAvailable("No healthy model server answered; retry shortly.", retry_after=1)


async def live(balancer: Balancer, request: Request) -> Response:
    return json_response({"live": True})


async def ready(balancer: Balancer, request: Request) -> Response:
    """Ready while one backend is: the balancer can serve a request then."""
    if not balancer.pool.candidates():
        raise NoBackendAvailable("No model server is ready; retry shortly.", retry_after=1)
    return json_response({"ready": True})


def _add(total: dict[str, object], part: dict[str, object]) -> None:
    """Sum one backend's model statistics into `total`: counts and times add up, the last inference
    is the latest one, and batch statistics add up per batch size."""
    for key, value in part.items():
        if key == "last_inference":
            total[key] = max(int(total.get(key, 0)), int(value))  # type: ignore[call-overload]
        elif key == "batch_stats":
            by_size = {b["batch_size"]: b for b in total.setdefault(key, [])}  # type: ignore[union-attr]
            for batch in value:  # type: ignore[union-attr]
                if batch["batch_size"] in by_size:
                    _add(by_size[batch["batch_size"]], {k: v for k, v in batch.items() if k != "batch_size"})
                else:
                    total[key].append(copy.deepcopy(batch))  # type: ignore[union-attr]
        elif isinstance(value, dict):
            _add(total.setdefault(key, {}), value)  # type: ignore[arg-type]
        elif isinstance(value, bool) or not isinstance(value, int):
            total.setdefault(key, value)  # names, versions, lists: the same on every backend
        else:
            total[key] = int(total.get(key, 0)) + value  # type: ignore[call-overload]


def sum_stats(answers: list[dict[str, object]]) -> dict[str, object]:
    """Triton's statistics document, summed over backends model by model (and version)."""
    models: dict[tuple[str, str], dict[str, object]] = {}
    for doc in answers:
        for entry in doc.get("model_stats", []):  # type: ignore[union-attr]
            _add(models.setdefault((entry["name"], entry["version"]), {}), entry)
    return {"model_stats": list(models.values())}


async def stats(balancer: Balancer, request: Request) -> Response:
    """The model's statistics summed over every backend that answers, healthy or not: an ejected
    server's past requests were still served."""
    answers = await asyncio.gather(*(_get(balancer, b, request.path) for b in list(balancer.pool.backends)))
    docs = [json.loads(body) for status, body in filter(None, answers) if status == 200]
    if docs:
        return json_response(sum_stats(docs))
    if any(got is not None and got[0] == 404 for got in answers):
        raise NotFound(f"No backend knows the model in {request.path}; see GET /v2/models/NAME.")
    raise NoBackendAvailable("No model server answered with statistics; retry shortly.", retry_after=1)


Route = Callable[[Balancer, Request], Awaitable[Response]]


def add_routes(app: App, balancer: Balancer, watch: float) -> None:
    """Both protocols' routes on the balancer; `watch` as /submit's, for the forwarded ones."""

    def add(method: str, path: str, handler: Route, **options: float) -> None:
        app.route(method, path, guarded(app, functools.partial(handler, balancer)), **options)  # type: ignore[arg-type]

    add("GET", "/v2/health/live", live)
    add("GET", "/v2/health/ready", ready)
    add("GET", "/v2", from_backends)
    add("GET", "/v2/models/stats", stats)
    for base in OIP_MODEL:
        add("GET", base, from_backends)
        for suffix in ("/ready", "/config"):
            add("GET", base + suffix, from_backends)
        add("GET", base + "/stats", stats)
        add("POST", base + "/infer", forward, watch=watch)
    for path in TFS_MODEL:
        add("GET", path, from_backends)
    for path in model_paths(TFS_MODEL, "/metadata"):
        add("GET", path, from_backends)
    for path in model_paths(TFS_MODEL, ":predict"):
        add("POST", path, forward, watch=watch)
