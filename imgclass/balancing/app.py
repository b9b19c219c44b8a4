"""The balancer's app: the page, POST /submit, membership, health and metrics, built by a factory."""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from importlib import resources

from .. import log
from ..web.app import App, Limits, Request, Response
from ..web.metrics import healthz, metrics_handler
from ..web.server import bind_socket, run, serve, socket_url
from . import admin, protocols
from .forward import Forward
from .settings import BalancerSettings
from .state import Balancer

# Requests answered within this time are not watched for a client that leaves: a watcher costs a
# task per request, a tenth of the balancer's CPU per forwarded request (bench/balancer.py), and
# a client that leaves sooner costs its backend at most this much more work.
WATCH_AFTER_S = 0.02


def load_page() -> bytes:
    return resources.files("imgclass.balancing").joinpath("templates/index.html").read_bytes()


async def submit(balancer: Balancer, request: Request) -> Response:
    """POST /submit: the raw upload goes, unparsed, to one model server's /predict."""
    return await Forward(balancer, request).run()


async def no_icon(request: Request) -> Response:
    return Response(b"", 204)


def create_app(settings: BalancerSettings, name: str | None = None) -> App:
    """The balancer as an app; its pool and HTTP client start with the app."""
    name = name or settings.name or f"{settings.host}:{settings.port}"
    logger = log.get_logger(name, "balancer", settings.log_level)
    balancer = Balancer(settings, name, logger)
    page = load_page()
    verbose = logger.enabled(logging.INFO)

    def on_done(request: Request, status: int, seconds: float) -> None:
        if verbose and request.path in ("/submit", "/predict"):
            logger.info("submit", status=status, ms=round(seconds * 1000, 2))

    app = App(logger, Limits(max_upload=settings.max_upload_bytes), on_done)
    app.state = balancer

    def bind(handler: Callable[[Balancer, Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
        return functools.partial(handler, balancer)

    async def index(request: Request) -> Response:
        return Response(page, 200, [(b"content-type", b"text/html; charset=utf-8")])

    app.route("GET", "/", index)
    app.route("GET", "/favicon.ico", no_icon)  # the page has its own inline; other routes' browsers ask
    # A client that leaves frees its place in the queue, or its slot and the upstream call.
    app.route("POST", "/submit", bind(submit), watch=WATCH_AFTER_S)
    # /predict too, so that the model server's curl line works on the balancer
    app.route("POST", "/predict", bind(submit), watch=WATCH_AFTER_S)
    protocols.add_routes(app, balancer, WATCH_AFTER_S)  # Open Inference Protocol v2 and TF Serving REST
    app.route("GET", "/labels", bind(admin.labels))
    app.route("GET", "/backends", bind(admin.list_backends))
    app.route("POST", "/backends", bind(admin.add_backend))
    app.route("DELETE", "/backends", bind(admin.remove_backend))
    app.route("GET", "/healthz", healthz)
    app.route("GET", "/metrics", metrics_handler(balancer.registry))

    async def start() -> None:
        await balancer.start()
        healthy = sum(b.healthy for b in balancer.pool.backends)
        logger.info("ready", backends=len(balancer.pool.backends), healthy=healthy, policy=settings.policy)

    app.on_startup.append(start)
    app.on_shutdown.append(balancer.stop)
    return app


def main(settings: BalancerSettings) -> None:
    """`imgclass balance`: bind, start the pool, serve until SIGTERM."""
    sock = bind_socket(settings.host, settings.port)
    name = settings.name or socket_url(sock).removeprefix("http://")
    app = create_app(settings, name)
    run(serve(app, sock, settings.server_options))
