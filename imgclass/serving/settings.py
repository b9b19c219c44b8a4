"""The model server's settings, resolved from flags, IMGCLASS_* variables and config.OPTIONS."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields

from .. import config
from ..web.server import ServerOptions


@dataclass(frozen=True)
class ServerSettings:
    """Resolved model-server options; defaults live only in config.OPTIONS (role 'serve')."""

    host: str
    port: int
    name: str | None
    log_level: str
    http: str
    backend: str
    model_dir: str
    model_name: str
    weights: str
    threads: int
    max_batch: int
    batch_timeout_ms: float
    max_queue: int
    max_wait_ms: float
    max_upload_mb: float
    max_pixels: int
    service_time: str
    seed: int | None

    @classmethod
    def make(cls, **overrides: object) -> ServerSettings:
        """Settings from the option table's defaults, with `overrides` (for tests and `imgclass up`)."""
        values = {f.name: config.OPTIONS[f.name].default_for(config.SERVE) for f in fields(cls)}
        return cls(**{**values, **overrides})  # type: ignore[arg-type]

    @classmethod
    def from_namespace(cls, ns: argparse.Namespace) -> ServerSettings:
        return cls(**{f.name: getattr(ns, f.name) for f in fields(cls)})

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1_000_000)

    @property
    def server_options(self) -> ServerOptions:
        return ServerOptions(http=self.http)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    config.add_role_options(parser, config.SERVE)
