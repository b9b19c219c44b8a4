"""`imgclass autoscale`: the controller as a process, with its policy, signals, actuator and /metrics."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

from .. import config, log
from ..errors import ConfigError
from ..queue.broker import Broker, client
from ..testbed.deploy import Connection, Deployer, Target, peer_address, targets_from_cluster
from ..web.app import App, Limits, Request, Response, json_response
from ..web.metrics import healthz, metrics_handler
from ..web.server import ServerOptions, bind_socket, serve, socket_url
from .actuators import Actuator, BalancerAdmin, LocalServers, LocalWorkers
from .controller import Controller
from .nodes import TestbedNodes
from .policies import Bounds, QueueDepth, ScalingPolicy, SloSizing, TargetTracking
from .signals import PushSignals, QueueSignals, Signals


@dataclass(frozen=True)
class AutoscaleSettings:
    host: str
    port: int
    log_level: str
    backend: str
    model_dir: str
    max_batch: int
    max_queue: int
    max_wait_ms: float
    service_time: str
    seed: int | None
    admin_token: str | None
    dispatch: str
    redis: str | None
    result_ttl: int
    max_deliveries: int
    heartbeat_ttl: float
    autoscale_policy: str
    scale_min: int
    scale_max: int
    scale_interval: float
    per_worker: float
    target_load: float
    tolerance: float
    upscale_delay: float
    downscale_window: float
    slo_ms: float
    slo_downscale_window: float
    slo_quantile: float
    headroom: float
    rate_window: float
    balancer_url: str | None
    actuator: str
    cluster: str | None
    ssh_key: str | None
    known_hosts: str | None
    remote_dir: str

    @classmethod
    def from_namespace(cls, ns: argparse.Namespace) -> AutoscaleSettings:
        values = {f.name: getattr(ns, f.name) for f in fields(cls)}
        settings = cls(**values)
        if settings.scale_min > settings.scale_max:
            raise ConfigError(f"--min {settings.scale_min} is above --max {settings.scale_max}; swap them.")
        if settings.dispatch == "queue" and not settings.redis:
            raise ConfigError("queue mode: pass --redis redis://HOST:PORT/0, the queue whose workers to size.")
        if settings.dispatch == "push" and not (settings.balancer_url and settings.admin_token):
            raise ConfigError("push mode: pass --balancer URL and --admin-token (or IMGCLASS_ADMIN_TOKEN), "
                              "to add and remove servers through the balancer's admin API.")  # fmt: skip
        if settings.actuator == "testbed" and not settings.cluster:
            raise ConfigError("--actuator testbed: pass --cluster cluster.json, whose server nodes it scales onto "
                              "(from 'imgclass testbed hosts').")  # fmt: skip
        return settings

    @classmethod
    def make(cls, **overrides: object) -> AutoscaleSettings:
        values = {f.name: config.OPTIONS[f.name].default_for(config.AUTOSCALE) for f in fields(cls)}
        return cls(**{**values, **overrides})  # type: ignore[arg-type]


def make_policy(settings: AutoscaleSettings) -> ScalingPolicy:
    bounds = Bounds(settings.scale_min, settings.scale_max)
    if settings.autoscale_policy == "queue_depth":
        return QueueDepth(bounds, settings.per_worker, settings.downscale_window)
    if settings.autoscale_policy == "target":
        return TargetTracking(bounds, settings.target_load, settings.tolerance, settings.upscale_delay,
                              settings.downscale_window)  # fmt: skip
    return SloSizing(bounds, settings.slo_ms / 1000, settings.headroom, settings.slo_quantile or None,
                     settings.slo_downscale_window, settings.tolerance)  # fmt: skip


def model_args(settings: AutoscaleSettings, model_dir: str | None) -> list[str]:
    args = ["--backend", settings.backend, "--service-time", settings.service_time, "--log-level", settings.log_level]
    if model_dir:
        args += ["--model-dir", model_dir]
    if settings.max_batch:
        args += ["--max-batch", str(settings.max_batch)]
    if settings.seed is not None:
        args += ["--seed", str(settings.seed)]
    return args


def queue_args(settings: AutoscaleSettings) -> list[str]:
    return ["--heartbeat-ttl", str(settings.heartbeat_ttl), "--max-deliveries", str(settings.max_deliveries),
            "--result-ttl", str(settings.result_ttl)]  # fmt: skip


def push_args(settings: AutoscaleSettings) -> list[str]:
    return ["--max-queue", str(settings.max_queue), "--max-wait-ms", str(settings.max_wait_ms)]


def local_actuator(settings: AutoscaleSettings, logger: log.EventLogger) -> Actuator:
    model = model_args(settings, settings.model_dir)
    if settings.dispatch == "queue":
        assert settings.redis is not None
        return LocalWorkers(["worker", "--host", "127.0.0.1", "--port", "0", "--redis", settings.redis,
                             *queue_args(settings), *model], logger)  # fmt: skip
    assert settings.balancer_url is not None and settings.admin_token is not None
    server = ["serve", "--host", "127.0.0.1", "--port", "0", "--threads", "1", *push_args(settings), *model]
    return LocalServers(server, settings.balancer_url, settings.admin_token, logger)


def nodes_actuator(settings: AutoscaleSettings, logger: log.EventLogger) -> Actuator:
    """The cluster's server nodes, over SSH, with the deploy code: a worker there reaches Redis on the
    balancer node over its own link, as deploy wires it; a server joins the balancer at its data address."""
    assert settings.cluster is not None
    targets = targets_from_cluster(settings.cluster, None, settings.remote_dir)
    nodes = [t for t in targets if t.role == "server"]
    if len(nodes) < settings.scale_max:
        raise ConfigError(f"{settings.cluster} lists {len(nodes)} server node(s), fewer than --max "
                          f"{settings.scale_max}; lower --max or reserve more nodes.")  # fmt: skip
    deployer = Deployer(targets, Connection(None, settings.ssh_key, settings.known_hosts, False),
                        out=lambda line: logger.info("deploy", line=line), dispatch=settings.dispatch)  # fmt: skip
    # a path on the nodes only if absolute; else each node's own models/ folder, which install fetches
    node_model_dir = settings.model_dir if settings.model_dir.startswith("/") else None
    model = model_args(settings, node_model_dir)

    def listen(t: Target) -> list[str]:
        return ["--host", "0.0.0.0", "--port", str(t.service_port), "--name", t.name]

    if settings.dispatch == "queue":
        hubs = [t for t in targets if t.role == "balancer"]
        if len(hubs) != 1:
            raise ConfigError(f"{settings.cluster}: queue mode needs exactly one balancer node, where Redis runs.")
        hub = hubs[0]
        return TestbedNodes(deployer, nodes, "worker", lambda t: [
            "--redis", f"redis://{peer_address(t, hub)}:{hub.redis_port}/0", *listen(t), *queue_args(settings), *model,
        ], logger, node_model_dir)  # fmt: skip
    assert settings.balancer_url is not None and settings.admin_token is not None
    admin = BalancerAdmin(settings.balancer_url, settings.admin_token, logger)
    return TestbedNodes(deployer, nodes, "server", lambda t: [*listen(t), *push_args(settings), *model], logger,
                        node_model_dir, admin)  # fmt: skip


ACTUATORS: dict[str, Callable[[AutoscaleSettings, log.EventLogger], Actuator]] = {
    "local": local_actuator,
    "testbed": nodes_actuator,
}


def build(settings: AutoscaleSettings, logger: log.EventLogger) -> Controller:
    signals: Signals
    if settings.dispatch == "queue":
        assert settings.redis is not None
        signals = QueueSignals(Broker(client(settings.redis, timeout=1.0)), settings.rate_window)
    else:
        assert settings.balancer_url is not None
        signals = PushSignals(settings.balancer_url, settings.rate_window)
    actuator = ACTUATORS[settings.actuator](settings, logger)
    return Controller(make_policy(settings), signals, actuator, settings.scale_interval, logger)


def create_app(settings: AutoscaleSettings, name: str) -> App:
    """The controller runs with this small app: /metrics (desired, current, decisions), / and /healthz."""
    logger = log.get_logger(name, "autoscale", settings.log_level)
    controller = build(settings, logger)
    app = App(logger, Limits(max_upload=1))
    app.state = controller
    stop = asyncio.Event()
    task: dict[str, asyncio.Task[None]] = {}

    async def info(request: Request) -> Response:
        last = controller.last
        doc: dict[str, Any] = {"policy": controller.policy.name, "desired": controller.desired,
                               "current": controller.actuator.ready, "reason": last.reason if last else None}  # fmt: skip
        return json_response(doc)

    async def start() -> None:
        task["run"] = asyncio.create_task(controller.run(stop))

    async def shutdown() -> None:
        stop.set()
        with contextlib.suppress(Exception):
            await task["run"]
        await controller.close()

    app.route("GET", "/", info)
    app.route("GET", "/healthz", healthz)
    app.route("GET", "/metrics", metrics_handler(controller.registry))
    app.on_startup.append(start)
    app.on_shutdown.append(shutdown)
    return app


def main(settings: AutoscaleSettings) -> None:
    from ..web.server import run

    sock = bind_socket(settings.host, settings.port)
    name = f"autoscale-{socket_url(sock).rsplit(':', 1)[1]}"
    app = create_app(settings, name)
    # Its children (workers, servers) do not outlive it: they are stopped in the app's shutdown, and
    # die with it if it is killed (process.Child asks Linux for that).
    run(serve(app, sock, ServerOptions()))
