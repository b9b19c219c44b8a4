"""The balancer's settings, resolved from flags, IMGCLASS_* variables and config.OPTIONS."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields

from .. import config
from ..errors import ConfigError
from ..testbed.inventory import backends_from_cluster
from ..web.server import ServerOptions

SOURCES = ("backends_file", "cluster")  # where backends come from, merged into `backends`


@dataclass(frozen=True)
class BalancerSettings:
    """Resolved balancer options; defaults live only in config.OPTIONS (role 'balance')."""

    host: str
    port: int
    name: str | None
    log_level: str
    http: str
    max_upload_mb: float
    seed: int | None
    backends: list[str]
    policy: str
    health_interval: float
    fall: int
    rise: int
    eject_seconds: float
    max_ejection_percent: int
    panic_threshold: int
    retry_budget: int
    try_timeout: float
    timeout: float
    connect_timeout: float
    max_conn: int
    queue_size: int
    queue_timeout: float
    admin_token: str | None
    dispatch: str = "push"
    redis: str | None = None
    result_ttl: int = 604_800
    engine: str = "python"  # the data plane; haproxy: this process is HAProxy's control plane
    slots: int = 0
    haproxy: str = "haproxy"
    haproxy_threads: int = 1

    @classmethod
    def make(cls, **overrides: object) -> BalancerSettings:
        values = {f.name: config.OPTIONS[f.name].default_for(config.BALANCE) for f in fields(cls)}
        values["backends"] = []
        return cls(**{**values, **overrides})  # type: ignore[arg-type]

    @classmethod
    def from_namespace(cls, ns: argparse.Namespace) -> BalancerSettings:
        backends = list(ns.backends or [])
        if ns.backends_file:
            backends += config.read_backends_file(ns.backends_file)
        if ns.cluster:
            backends += backends_from_cluster(ns.cluster)
        if ns.dispatch == "queue":
            if ns.engine != "python":
                raise ConfigError(f"--engine {ns.engine} forwards pushed requests; queue mode has no data plane to "
                                  "replace: leave --engine out with --dispatch queue.")
            if not ns.redis:
                raise ConfigError("--dispatch queue needs the job queue: pass --redis redis://HOST:PORT/0 (or IMGCLASS_REDIS).")
        elif not backends and not ns.admin_token:
            raise ConfigError(
                "no backends: pass --backends URL,URL, --backends-file FILE or --cluster cluster.json "
                "(or IMGCLASS_BACKENDS), or --dispatch queue --redis URL for pull dispatch, or --admin-token "
                "to start empty and add them through POST /backends (as the autoscaler does)."
            )
        values = {f.name: getattr(ns, f.name) for f in fields(cls) if f.name != "backends"}
        return cls(backends=backends, **values)

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1_000_000)

    @property
    def server_options(self) -> ServerOptions:
        return ServerOptions(http=self.http)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    config.add_role_options(parser, config.BALANCE)

