"""A queue worker's settings, resolved from flags, IMGCLASS_* variables and config.OPTIONS (role 'worker')."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields

from .. import config
from ..errors import ConfigError
from ..web.server import ServerOptions


@dataclass(frozen=True)
class WorkerSettings:
    host: str
    port: int
    name: str | None
    log_level: str
    http: str
    backend: str
    model_dir: str
    weights: str
    max_batch: int
    batch_timeout_ms: float
    max_pixels: int
    service_time: str
    seed: int | None
    redis: str | None
    result_ttl: int
    max_deliveries: int
    heartbeat_ttl: float

    @classmethod
    def make(cls, **overrides: object) -> WorkerSettings:
        values = {f.name: config.OPTIONS[f.name].default_for(config.WORKER) for f in fields(cls)}
        return cls(**{**values, **overrides})  # type: ignore[arg-type]

    @classmethod
    def from_namespace(cls, ns: argparse.Namespace) -> WorkerSettings:
        if not ns.redis:
            raise ConfigError("a worker needs the job queue: pass --redis redis://HOST:PORT/0 (or IMGCLASS_REDIS).")
        return cls(**{f.name: getattr(ns, f.name) for f in fields(cls)})

    @property
    def server_options(self) -> ServerOptions:
        return ServerOptions(http=self.http)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    config.add_role_options(parser, config.WORKER)
