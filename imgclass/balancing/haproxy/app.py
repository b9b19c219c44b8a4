"""Engine mode's app and process: the page, /backends, the admin API and /metrics behind HAProxy, which forwards the rest.

HAProxy listens on the public --port (a socket this process binds and hands over, so that port 0
works and a restarted HAProxy takes the same socket); this app listens on a private UNIX socket
in the engine's folder, and HAProxy routes it everything that is not a forwarded inference route.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import shutil
import signal
import socket
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import FrameType

import aiohttp
import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ... import log
from ...errors import NoBackendAvailable, NotFound
from ...serving.protocols.wire import OIP_MODEL, TFS_MODEL, guarded, model_paths
from ...web.app import App, Limits, Request, Response, json_response
from ...web.metrics import healthz
from ...web.server import BACKLOG, ServerOptions, attach_uvicorn_log, bind_socket, run, socket_url, uvicorn_config
from ..admin import check_token, url_to_add, url_to_remove
from ..app import load_page, no_icon
from ..protocols import sum_stats
from ..settings import BalancerSettings
from .membership import check_urls
from .plane import ControlPlane
from .process import find_binary
from .state import snapshot

_JSON = [(b"content-type", b"application/json")]
Handler = Callable[[ControlPlane, Request], Awaitable[Response]]


# --- the routes: the Python engine's shapes, from HAProxy's state ---------------------------------


async def list_backends(plane: ControlPlane, request: Request) -> Response:
    return json_response(await plane.backends())


async def add_backend(plane: ControlPlane, request: Request) -> Response:
    check_token(plane.settings.admin_token, request)
    member = await plane.membership.add(url_to_add(request))
    plane.learn_names()
    return json_response(snapshot(member, None), 201)  # down until its --rise checks pass


async def remove_backend(plane: ControlPlane, request: Request) -> Response:
    check_token(plane.settings.admin_token, request)
    url = url_to_remove(request)
    await plane.membership.remove(url)  # drains: requests in flight finish, no new ones go there
    return json_response({"removed": url})


async def _get(plane: ControlPlane, url: str) -> tuple[int, bytes] | None:
    """GET one model server URL within the health check's timeout; None if it gave no answer."""
    assert plane.session is not None
    try:
        async with plane.session.get(url) as answer:
            return answer.status, await answer.read()
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
        return None


async def labels(plane: ControlPlane, request: Request) -> Response:
    """The model's class list, as a healthy model server gives it (fetched once, then kept)."""
    if plane.labels is None:
        for member in await plane.candidates():
            got = await _get(plane, member.url + "/labels")
            if got is not None and got[0] == 200:
                plane.labels = got[1]
                break
        else:
            raise NoBackendAvailable("No healthy model server can list the labels; retry shortly.", retry_after=1)
    return Response(plane.labels, 200, list(_JSON))


async def metrics(plane: ControlPlane, request: Request) -> Response:
    await plane.scrape()
    return Response(generate_latest(plane.registry), 200, [(b"content-type", CONTENT_TYPE_LATEST.encode())])


async def live(plane: ControlPlane, request: Request) -> Response:
    return json_response({"live": True})


async def ready(plane: ControlPlane, request: Request) -> Response:
    """Ready while one backend is: HAProxy can forward a request then."""
    if not await plane.candidates():
        raise NoBackendAvailable("No model server is ready; retry shortly.", retry_after=1)
    return json_response({"ready": True})


async def from_backends(plane: ControlPlane, request: Request) -> Response:
    """The first answer, other than a 5xx, that a healthy backend gives to the same GET."""
    for member in await plane.candidates():
        got = await _get(plane, member.url + request.path)
        if got is not None and got[0] < 500:
            return Response(got[1], got[0], list(_JSON))
    raise NoBackendAvailable("No healthy model server answered; retry shortly.", retry_after=1)


async def model_stats(plane: ControlPlane, request: Request) -> Response:
    """The model's statistics summed over every backend that answers, as the Python engine does."""
    answers = await asyncio.gather(*(_get(plane, m.url + request.path) for m in plane.membership.members()))
    docs = [json.loads(body) for status, body in filter(None, answers) if status == 200]
    if docs:
        return json_response(sum_stats(docs))
    if any(got is not None and got[0] == 404 for got in answers):
        raise NotFound(f"No backend knows the model in {request.path}; see GET /v2/models/NAME.")
    raise NoBackendAvailable("No model server answered with statistics; retry shortly.", retry_after=1)


def create_app(plane: ControlPlane) -> App:
    """The control plane's app; HAProxy stops with it (serve() starts it first)."""
    logger = plane.logger
    app = App(logger, Limits(max_upload=plane.settings.max_upload_bytes))
    app.state = plane
    page = load_page()

    def bind(handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        return functools.partial(handler, plane)

    def protocol(method: str, path: str, handler: Handler) -> None:
        app.route(method, path, guarded(app, bind(handler)))

    async def index(request: Request) -> Response:
        return Response(page, 200, [(b"content-type", b"text/html; charset=utf-8")])

    app.route("GET", "/", index)
    app.route("GET", "/favicon.ico", no_icon)
    app.route("GET", "/labels", bind(labels))
    app.route("GET", "/backends", bind(list_backends))
    app.route("POST", "/backends", bind(add_backend))
    app.route("DELETE", "/backends", bind(remove_backend))
    app.route("GET", "/healthz", healthz)
    app.route("GET", "/metrics", bind(metrics))
    # The protocols' GET routes; their infer and :predict go through HAProxy to a model server.
    protocol("GET", "/v2/health/live", live)
    protocol("GET", "/v2/health/ready", ready)
    protocol("GET", "/v2", from_backends)
    protocol("GET", "/v2/models/stats", model_stats)
    for base in OIP_MODEL:
        for suffix in ("", "/ready", "/config"):
            protocol("GET", base + suffix, from_backends)
        protocol("GET", base + "/stats", model_stats)
    for path in (*TFS_MODEL, *model_paths(TFS_MODEL, "/metadata")):
        protocol("GET", path, from_backends)

    app.on_shutdown.append(plane.stop)
    return app


# --- the process ----------------------------------------------------------------------------------


class _ControlServer(uvicorn.Server):
    """uvicorn, except that SIGTERM and SIGINT start engine mode's ordered stop (HAProxy drains first),
    and that it wakes once a second instead of ten times: the control plane is idle nearly always,
    and those wake-ups were most of its CPU, which bench/balancer.py counts per forwarded request."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.loop = asyncio.get_running_loop()
        self.stop_requested = asyncio.Event()
        self._exit = asyncio.Event()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # a signal handler, between two bytecodes of the loop's thread: hand the news to the loop
        if self.stop_requested.is_set() and sig == signal.SIGINT:
            self.force_exit = True  # a second Ctrl-C, as uvicorn's own
        self.loop.call_soon_threadsafe(self.stop_requested.set)

    def exit(self) -> None:
        self.should_exit = True
        self._exit.set()

    async def main_loop(self) -> None:
        counter = 0
        while not await self.on_tick(counter):
            counter = (counter + 10) % 864000  # on_tick refreshes the Date header every 10th count
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._exit.wait(), 1.0)


def bind_private(path: Path) -> socket.socket:
    """The app's socket: a UNIX socket in the engine's own folder, reachable only by this user (HAProxy)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    os.chmod(path, 0o600)
    sock.listen(BACKLOG)
    sock.setblocking(False)
    return sock


async def serve(app: App, plane: ControlPlane, sock: socket.socket, options: ServerOptions, url: str) -> None:
    """Serve the app, announce the public URL once HAProxy forwards, and on SIGTERM drain HAProxy, then the app.

    The lines `listening url=...` and `stopped` are what supervisors (imgclass up, the tests) wait for.
    """
    logger = app.logger
    attach_uvicorn_log(logger)
    try:
        # HAProxy first, outside uvicorn's startup: a failure to start it is a named error that the
        # command reports in one sentence (uvicorn would exit from inside its task instead).
        await plane.start()
        process = plane.process
        logger.info("ready", engine="haproxy", backends=len(plane.membership.members()), slots=plane.layout.slots,
                    policy=plane.settings.policy, haproxy_pid=process.pid if process else None)  # fmt: skip
        server = _ControlServer(uvicorn_config(app, options))
        task = asyncio.ensure_future(server.serve(sockets=[sock]))
        while not server.started and not task.done():
            await asyncio.sleep(0.01)
        if server.started:
            logger.notice("listening", url=url, engine="haproxy")
        stop = asyncio.ensure_future(server.stop_requested.wait())
        await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if not task.done():
            logger.notice("stopping")
            await plane.drain()
            server.exit()
        await task
    finally:
        await plane.stop()
    logger.notice("stopped")


def main(settings: BalancerSettings) -> None:
    """`imgclass balance --engine haproxy`: check HAProxy, bind, start both, serve until SIGTERM."""
    binary = find_binary(settings.haproxy)  # without HAProxy, stop here and say how to install it
    check_urls(settings.backends)
    public = bind_socket(settings.host, settings.port)
    url = socket_url(public)
    name = settings.name or url.removeprefix("http://")
    logger = log.get_logger(name, "balancer", settings.log_level)
    directory = Path(tempfile.mkdtemp(prefix="imgclass-haproxy-"))  # mode 0700: the sockets are ours alone
    try:
        plane = ControlPlane(settings, name, binary, public, directory, logger)
        private = bind_private(plane.layout.control_socket)
        run(serve(create_app(plane), plane, private, settings.server_options, url))
    finally:
        public.close()
        shutil.rmtree(directory, ignore_errors=True)
