"""Every option, its default and its IMGCLASS_* variable, in one table; parsing and validation."""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from .errors import ConfigError

ENV_PREFIX = "IMGCLASS_"


# --- value parsers: each raises ValueError with a sentence that says what is expected ----


def port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise ValueError("a port is a whole number from 0 to 65535 (0 picks a free one)")
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError("it must be a whole number of at least 1")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError("it must be a whole number of at least 0")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise ValueError("it must be a number greater than 0")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise ValueError("it must be a number of at least 0")
    return value


def choice(*allowed: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in allowed:
            raise ValueError(f"choose one of: {', '.join(allowed)}")
        return text

    parse.__name__ = "choice"
    return parse


def url(text: str) -> str:
    text = text.strip().rstrip("/")
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{text!r} is not an http(s) URL such as http://10.10.1.1:5000")
    try:
        parts.port  # noqa: B018 - urlsplit validates the port lazily
    except ValueError as exc:
        raise ValueError(f"{text!r} has an invalid port") from exc
    return text


def url_list(text: str) -> list[str]:
    items = [item for item in re.split(r"[,\s]+", text) if item]
    return [url(item) for item in items]


def int_list(text: str) -> list[int]:
    return [positive_int(item) for item in text.split(",") if item.strip()]


def float_list(text: str) -> list[float]:
    return [positive_float(item) for item in text.split(",") if item.strip()]


def str_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def service_time(text: str) -> str:
    from .servicetime import parse_service_time

    parse_service_time(text)  # validates; the string itself is what we pass around
    return text


def log_level(text: str) -> str:
    text = text.upper()
    if text not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ValueError("choose one of: debug, info, warning, error")
    return text


BACKENDS = ("litert", "keras", "sleep")
POLICIES = ("random", "round_robin", "least_outstanding", "p2c")


@dataclass(frozen=True)
class Option:
    """One command-line option with its environment fallback."""

    name: str
    parse: Callable[[str], Any]
    default: Any
    help: str
    metavar: str | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()


# The single table of defaults. README's "Configuration" section is checked against it by a test.
OPTIONS: dict[str, Option] = {
    o.name: o
    for o in [
        Option("host", str, "127.0.0.1", "address to listen on (0.0.0.0 for every interface)"),
        Option("port", port, 5001, "TCP port to listen on (0 picks a free one)"),
        Option("name", str, None, "name used in logs and responses (default host:port)"),
        Option("log_level", log_level, "INFO", "debug, info, warning or error"),
        # model server
        Option("backend", choice(*BACKENDS), "litert", "inference backend: litert, keras or sleep"),
        Option("model_dir", str, "models", "folder holding the .tflite model and imagenet_labels.txt"),
        Option(
            "weights", str, "imagenet", "keras only: 'imagenet' (Keras cache/download), 'random', or a .h5/.keras path"
        ),
        Option("threads", non_negative_int, 0, "inference worker threads (0 = one per CPU core)"),
        Option("max_batch", positive_int, 0, "largest dynamic batch (0 = 1 for litert/sleep, 8 for keras)"),
        Option("batch_timeout_ms", non_negative_float, 2.0, "longest wait to fill a batch, in ms"),
        Option("max_queue", positive_int, 128, "requests waiting beyond the workers before 503"),
        Option("max_upload_mb", positive_float, 20.0, "largest request body, in MB"),
        Option("max_pixels", positive_int, 50_000_000, "largest image, in pixels (width x height)"),
        Option(
            "service_time", service_time, "exp:20ms", "sleep backend only: exp:20ms, const:5ms or lognormal:20ms,0.5"
        ),
        Option("seed", int, None, "seed for the random choices (service times, dispatch)"),
        # balancer
        Option("backends", url_list, None, "comma-separated model server URLs"),
        Option("backends_file", str, None, "file with one model server URL per line"),
        Option("cluster", str, None, "cluster.json from 'imgclass testbed hosts': its servers become backends"),
        Option("policy", choice(*POLICIES), "random", "dispatch policy: " + ", ".join(POLICIES)),
        Option("health_interval", positive_float, 1.0, "seconds between active /readyz checks"),
        Option("fall", positive_int, 3, "failed checks in a row that mark a backend down"),
        Option("rise", positive_int, 2, "passed checks in a row that mark it up again"),
        Option("eject_seconds", positive_float, 5.0, "how long a backend is ejected after an error"),
        Option("timeout", positive_float, 30.0, "read timeout to a backend, in seconds (504 after)"),
        Option("connect_timeout", positive_float, 1.0, "connect timeout to a backend, in seconds"),
        Option(
            "max_conn",
            non_negative_int,
            0,
            "requests in flight per backend; more wait in the balancer's queue (0 = no limit)",
        ),
        Option("queue_size", positive_int, 1024, "requests that may wait at the balancer for a slot before 503"),
        Option("queue_timeout", positive_float, 10.0, "seconds a request may wait at the balancer before 503"),
        Option("admin_token", str, None, "bearer token for POST/DELETE /backends (unset: disabled)"),
        # local cluster
        Option("servers", positive_int, 3, "number of model servers 'imgclass up' starts"),
    ]
}


def _env_default(option: Option, environ: dict[str, str] | os._Environ[str]) -> Any:
    raw = environ.get(option.env)
    if raw is None or raw == "":
        return option.default
    try:
        return option.parse(raw)
    except (ValueError, ConfigError) as exc:
        raise ConfigError(f"{option.env}={raw!r} is invalid: {exc}. Fix or unset that variable.") from exc


def resolved_default(name: str) -> Any:
    """The option's value when no flag is given: its IMGCLASS_* variable, else the table's default."""
    return _env_default(OPTIONS[name], os.environ)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(f"{message}. Run with --help to see the options.")


def add_options(
    parser: argparse.ArgumentParser,
    names: Sequence[str],
    overrides: dict[str, Any] | None = None,
    environ: dict[str, str] | os._Environ[str] | None = None,
) -> None:
    """Add the named options; defaults come from the env var, else `overrides`, else the table."""
    environ = os.environ if environ is None else environ
    overrides = overrides or {}
    for name in names:
        option = OPTIONS[name]
        if name in overrides:
            option = Option(option.name, option.parse, overrides[name], option.help, option.metavar)
        default = _env_default(option, environ)

        def typed(text: str, _option: Option = option) -> Any:
            try:
                return _option.parse(text)
            except (ValueError, ConfigError) as exc:
                raise argparse.ArgumentTypeError(str(exc)) from exc

        typed.__name__ = option.parse.__name__
        parser.add_argument(
            option.flag,
            dest=name,
            type=typed,
            default=default,
            metavar=option.metavar,
            help=f"{option.help} [env {option.env}; default {option.default!r}]",
        )


def make_parser(prog: str, description: str) -> argparse.ArgumentParser:
    return _Parser(prog=prog, description=description)


def read_backends_file(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as fh:
            lines = [line.split("#", 1)[0].strip() for line in fh]
    except OSError as exc:
        raise ConfigError(f"cannot read --backends-file {path!r} ({exc.strerror}); check the path.") from exc
    try:
        return [url(line) for line in lines if line]
    except ValueError as exc:
        raise ConfigError(f"--backends-file {path!r}: {exc}; put one URL per line.") from exc
