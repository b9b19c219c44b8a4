"""Every option, its default, its IMGCLASS_* variable and the commands that take it, in one table."""

from __future__ import annotations

import argparse
import importlib
import math
import os
import random
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from .errors import ConfigError

ENV_PREFIX = "IMGCLASS_"


# --- value parsers: each raises ValueError with a sentence that says what is expected ----


def _whole(text: str, what: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise ValueError(f"{text!r} is not a whole number; {what}") from None


def _number(text: str, what: str) -> float:
    try:
        value = float(text.strip())
    except ValueError:
        raise ValueError(f"{text!r} is not a number; {what}") from None
    if not math.isfinite(value):
        raise ValueError(f"{text!r} is not a finite number; {what}")
    return value


def port(text: str) -> int:
    what = "give a port, a whole number from 0 to 65535 (0 picks a free one)"
    value = _whole(text, what)
    if not 0 <= value <= 65535:
        raise ValueError(what)
    return value


def positive_int(text: str) -> int:
    what = "give a whole number of at least 1"
    if _whole(text, what) < 1:
        raise ValueError(what)
    return int(text)


def non_negative_int(text: str) -> int:
    what = "give a whole number of at least 0"
    if _whole(text, what) < 0:
        raise ValueError(what)
    return int(text)


def positive_float(text: str) -> float:
    what = "give a number greater than 0"
    value = _number(text, what)
    if not value > 0:
        raise ValueError(what)
    return value


def non_negative_float(text: str) -> float:
    what = "give a number of at least 0"
    value = _number(text, what)
    if not value >= 0:
        raise ValueError(what)
    return value


def percent(value: str) -> int:
    what = "give a whole number of percent from 0 to 100"
    number = _whole(value, what)
    if not 0 <= number <= 100:
        raise ValueError(what)
    return number


def fraction(value: str) -> float:
    what = "give a number from 0 to 1, such as 0.95"
    number = _number(value, what)
    if not 0 <= number < 1:
        raise ValueError(what)
    return number


def min_max(value: str) -> tuple[int, int]:
    what = "give MIN:MAX, two whole numbers with 1 <= MIN <= MAX, such as 1:8"
    low, sep, high = value.partition(":")
    if not sep:
        raise ValueError(f"{value!r} is not MIN:MAX; {what}")
    lo, hi = _whole(low, what), _whole(high, what)
    if not 1 <= lo <= hi:
        raise ValueError(what)
    return lo, hi


def integer(text: str) -> int:
    return _whole(text, "give a whole number such as 1")


def text(value: str) -> str:
    if not value.strip():
        raise ValueError("it is empty; give a value or leave the option out")
    return value


_SEGMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def path_segment(value: str) -> str:
    """A name that is one URL path segment, e.g. the model in /v2/models/NAME/infer."""
    text(value)
    if not _SEGMENT.fullmatch(value):
        raise ValueError(
            f"{value!r} cannot be one URL path segment; use letters, digits, '_', '.' and '-' "
            "(up to 128), e.g. mobilenet_v2"
        )
    return value


# Checked as text is (tests/test_config.py picks a bad value by the parser's name): a blank is refused too.
path_segment.__name__ = "text"


def choice(*allowed: str) -> Callable[[str], str]:
    def parse(value: str) -> str:
        if value not in allowed:
            raise ValueError(f"{value!r} is not one of: {', '.join(allowed)}")
        return value

    parse.__name__ = "choice"
    return parse


def registry(module: str, table: str) -> Callable[[str], str]:
    """A choice among the keys of a table of classes (policies, backends), read from the table
    itself when a value is parsed, so the names are written once: where the classes are."""

    def names() -> list[str]:
        return list(getattr(importlib.import_module(module), table))

    def parse(value: str) -> str:
        if value not in names():
            raise ValueError(f"{value!r} is not one of: {', '.join(names())}")
        return value

    parse.__name__ = "choice"
    parse.names = names  # type: ignore[attr-defined]
    return parse


def url(value: str) -> str:
    """A model server's base URL: plain http, a host and maybe a port and path, no credentials."""
    value = value.strip().rstrip("/")
    parts = urlsplit(value)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(
            f"{value!r} is not an http:// URL such as http://10.10.1.1:5001 "
            "(model servers speak plain HTTP; put TLS in front of the balancer, not behind it)"
        )
    if parts.username or parts.password:
        raise ValueError(f"{urlsplit(value)._replace(netloc=parts.hostname).geturl()!r} carries credentials; "
                         "model server URLs take none: remove the user:password@ part")  # fmt: skip
    if parts.query or parts.fragment:
        raise ValueError(f"{value!r} has a query or fragment; give only scheme, host, port and path")
    try:
        parts.port  # noqa: B018 - urlsplit validates the port lazily
    except ValueError:
        raise ValueError(f"{value!r} has an invalid port; use a whole number from 1 to 65535") from None
    return value


def redis_url(value: str) -> str:
    value = value.strip()
    parts = urlsplit(value)
    if parts.scheme not in ("redis", "rediss", "unix") or not (parts.hostname or parts.path):
        raise ValueError(f"{value!r} is not a Redis URL; give one such as redis://127.0.0.1:6379/0")
    try:
        parts.port  # noqa: B018 - urlsplit validates the port lazily
    except ValueError:
        raise ValueError(f"{value!r} has an invalid port; use a whole number from 1 to 65535") from None
    return value


def url_list(value: str) -> list[str]:
    items = [item for item in re.split(r"[,\s]+", value) if item]
    if not items:
        raise ValueError("it lists no URL; give one or more, comma-separated")
    return [url(item) for item in items]


def int_list(value: str) -> list[int]:
    return [positive_int(item) for item in value.split(",") if item.strip()]


def float_list(value: str) -> list[float]:
    return [positive_float(item) for item in value.split(",") if item.strip()]


def str_list(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def log_level(value: str) -> str:
    upper = value.upper()
    if upper not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ValueError(f"{value!r} is not one of: debug, info, warning, error")
    return upper


# --- durations and service-time distributions (the sleep backend's --service-time) ---------

_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6}
_DURATION = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e-?[0-9]+)?)\s*(s|ms|us)?\s*$")


def parse_duration(value: str) -> float:
    """'20ms' -> 0.02 seconds; a bare number is seconds."""
    match = _DURATION.match(value)
    if not match:
        raise ValueError(f"{value!r} is not a duration such as 20ms, 0.5s or 300us")
    return float(match.group(1)) * _UNITS[match.group(2) or "s"]


@dataclass(frozen=True)
class ServiceTime:
    """A distribution of service times in seconds."""

    kind: str
    mean: float
    sigma: float = 0.0

    def sample(self, rng: random.Random) -> float:
        if self.kind == "const":
            return self.mean
        if self.kind == "exp":
            return rng.expovariate(1.0 / self.mean)
        # lognormal parametrised by its mean and the sigma of the underlying normal
        mu = math.log(self.mean) - self.sigma**2 / 2
        return rng.lognormvariate(mu, self.sigma)

    @property
    def std(self) -> float:
        if self.kind == "const":
            return 0.0
        if self.kind == "exp":
            return self.mean
        return self.mean * math.sqrt(math.exp(self.sigma**2) - 1)


def parse_service_time(value: str) -> ServiceTime:
    kind, _, rest = value.partition(":")
    kind = kind.strip().lower()
    if kind not in ("exp", "const", "lognormal") or not rest:
        raise ValueError(f"{value!r}: write exp:20ms, const:5ms or lognormal:20ms,0.5")
    if kind == "lognormal":
        mean_text, _, sigma_text = rest.partition(",")
        if not sigma_text:
            raise ValueError(f"{value!r}: lognormal needs a mean and a sigma, e.g. lognormal:20ms,0.5")
        sigma = _number(sigma_text, "the lognormal sigma is a number such as 0.5")
        if sigma <= 0:
            raise ValueError(f"{value!r}: the lognormal sigma must be greater than 0")
        mean = parse_duration(mean_text)
    else:
        mean, sigma = parse_duration(rest), 0.0
    if mean <= 0:
        raise ValueError(f"{value!r}: the mean service time must be greater than 0")
    return ServiceTime(kind, mean, sigma)


def service_time(value: str) -> str:
    parse_service_time(value)  # validates; the string itself is what we pass around
    return value


# --- the table ------------------------------------------------------------------------------

# The commands that take options from the table; an option lists the ones it belongs to.
SERVE, BALANCE, UP, WORKER, REDIS, AUTOSCALE = "serve", "balance", "up", "worker", "redis", "autoscale"
ROLES = (SERVE, BALANCE, UP, WORKER, REDIS, AUTOSCALE)


@dataclass(frozen=True)
class Option:
    """One command-line option with its environment fallback."""

    name: str
    parse: Callable[[str], Any]
    default: Any
    help: str
    roles: tuple[str, ...] = ()
    role_defaults: Mapping[str, Any] = field(default_factory=dict)  # e.g. port 5000 for the balancer
    role_flags: Mapping[str, str] = field(default_factory=dict)  # e.g. --policy for `imgclass autoscale`

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    def describe(self) -> str:
        """The help text, with {choices} filled in from the table the names live in."""
        names = getattr(self.parse, "names", None)
        return self.help.format(choices=", ".join(names())) if names else self.help

    def flag_for(self, role: str | None) -> str:
        return self.role_flags.get(role, self.flag) if role else self.flag

    def default_for(self, role: str | None) -> Any:
        return self.role_defaults.get(role, self.default) if role else self.default


_ALL = (SERVE, BALANCE, UP, WORKER)
_SERVER = (SERVE, UP)
_MODEL = (SERVE, UP, WORKER, AUTOSCALE)  # what loads and runs the model, or starts what does
_BALANCER = (BALANCE, UP)
_POLICIES = registry("imgclass.balancing.policies", "POLICIES")
_SCALING = registry("imgclass.autoscale.policies", "POLICIES")
_BACKENDS = registry("imgclass.serving.backends", "BACKENDS")
_ENGINES = registry("imgclass.balancing.engines", "ENGINES")

# The single table of defaults. README's "Configuration" section is checked against it by a test.
OPTIONS: dict[str, Option] = {
    o.name: o
    for o in [
        Option("host", text, "127.0.0.1",
               "address to listen on (0.0.0.0 for every interface; for redis, a comma-separated list)",
               (*_ALL, REDIS, AUTOSCALE)),
        Option("port", port, 5001, "TCP port to listen on (0 picks a free one); a worker serves /metrics there",
               (*_ALL, REDIS, AUTOSCALE), {BALANCE: 5000, UP: 5000, WORKER: 0, REDIS: 6379, AUTOSCALE: 0}),
        Option("name", text, None, "name used in logs and responses (default host:port)", (SERVE, BALANCE, WORKER)),
        Option("log_level", log_level, "INFO", "debug, info, warning or error", (*_ALL, REDIS, AUTOSCALE)),
        Option("http", choice("httptools", "h11"), "httptools",
               "uvicorn's HTTP parser: httptools (fastest) or h11 (also bounds the request head)", _ALL),
        # model server
        Option("backend", _BACKENDS, "litert", "inference backend: {choices}", _MODEL),
        Option("model_dir", text, "models", "folder holding the .tflite model and imagenet_labels.txt", _MODEL),
        Option("model_name", path_segment, "mobilenet_v2",
               "the model's name in the Open Inference Protocol and TF Serving routes (/v2/models/NAME)", _SERVER),
        Option("weights", text, "imagenet",
               "keras only: 'imagenet' (Keras cache/download), 'random', or a .h5/.keras path", (SERVE, WORKER)),
        Option("threads", non_negative_int, 0, "inference worker threads (0 = one per CPU core)", _SERVER),
        Option("max_batch", non_negative_int, 0, "largest dynamic batch (0 = 1 for litert/sleep, 8 for keras)",
               _MODEL),
        Option("batch_timeout_ms", non_negative_float, 2.0, "longest wait to fill a batch, in ms", (SERVE, WORKER)),
        Option("max_queue", non_negative_int, 0,
               "images waiting beyond the workers before 503 (0 = 8 per worker; keras 16; sleep 1024)",
               (*_SERVER, AUTOSCALE)),
        Option("max_wait_ms", non_negative_float, 50.0,
               "refuse (503) an image whose expected wait in the queue is longer, in ms (0 = no bound; "
               "not for the sleep backend)", (*_SERVER, AUTOSCALE)),
        Option("max_upload_mb", positive_float, 20.0, "largest request body, in MB", (SERVE, BALANCE)),
        Option("max_pixels", positive_int, 50_000_000, "largest image, in pixels (width x height)", (SERVE, WORKER)),
        Option("service_time", service_time, "exp:20ms",
               "sleep backend only: exp:20ms, const:5ms or lognormal:20ms,0.5", _MODEL),
        Option("seed", integer, None, "seed for the random choices (service times, dispatch)", (*_ALL, AUTOSCALE)),
        # balancer
        Option("backends", url_list, None, "comma-separated model server URLs", (BALANCE,)),
        Option("backends_file", text, None, "file with one model server URL per line", (BALANCE,)),
        Option("cluster", text, None, "cluster.json from 'imgclass testbed hosts': its servers become backends "
               "(for autoscale, the nodes the testbed actuator scales onto)", (BALANCE, AUTOSCALE)),
        Option("policy", _POLICIES, "random", "dispatch policy: {choices}",
               _BALANCER),
        Option("health_interval", positive_float, 1.0, "seconds between active /readyz checks", (BALANCE,)),
        Option("fall", positive_int, 3, "failed checks in a row that mark a backend down", (BALANCE,)),
        Option("rise", positive_int, 2, "passed checks in a row that mark it up again", (BALANCE,)),
        Option("eject_seconds", positive_float, 5.0, "how long a backend is ejected after an error", (BALANCE,)),
        Option("max_ejection_percent", percent, 50,
               "most of the backends ejected at once, in percent (one always stays in service)", (BALANCE,)),
        Option("panic_threshold", percent, 50,
               "below this percent of healthy backends not ejected, ejections are disregarded", (BALANCE,)),
        Option("retry_budget", percent, 20,
               "retries of shed (503) or timed-out tries in flight, in percent of requests in flight (min 3)",
               (BALANCE,)),
        Option("try_timeout", non_negative_float, 0.0,
               "seconds one try may take before it is retried on another backend (0 = off)", (BALANCE,)),
        Option("timeout", positive_float, 30.0, "read timeout to a backend, in seconds (504 after)", (BALANCE,)),
        Option("connect_timeout", positive_float, 1.0, "connect timeout to a backend, in seconds", (BALANCE,)),
        Option("max_conn", non_negative_int, 0,
               "requests in flight per backend; more wait in the balancer's queue (0 = no limit)", _BALANCER),
        Option("queue_size", positive_int, 1024, "requests that may wait at the balancer for a slot before 503",
               _BALANCER),
        Option("queue_timeout", positive_float, 10.0, "seconds a request may wait at the balancer before 503",
               _BALANCER),
        Option("admin_token", text, None, "bearer token for POST/DELETE /backends (unset: disabled)",
               (*_BALANCER, AUTOSCALE)),
        # engine mode: HAProxy forwards, the balancer's process is its control plane
        Option("engine", _ENGINES, "python",
               "the balancer's data plane: {choices} (haproxy: HAProxy forwards, driven by this process)", _BALANCER),
        Option("slots", non_negative_int, 0,
               "engine haproxy: server slots declared in haproxy.cfg, the most backends it can hold "
               "(0 = twice the starting backends, at least 8)", (BALANCE,)),
        Option("haproxy", text, "haproxy", "engine haproxy: the haproxy program, a name on PATH or a path",
               (BALANCE,)),
        Option("haproxy_threads", positive_int, 1,
               "engine haproxy: HAProxy's threads (nbthread; 1 matches nginx's single worker)", (BALANCE,)),
        # queue mode (pull dispatch)
        Option("dispatch", choice("push", "queue"), "push",
               "push: the balancer sends each request to a server; queue: workers pull jobs from Redis",
               (*_BALANCER, AUTOSCALE)),
        Option("redis", redis_url, None,
               "Redis URL of the job queue, e.g. redis://10.10.5.2:6379/0 (queue mode; 'imgclass up' starts "
               "its own when unset)", (BALANCE, UP, WORKER, AUTOSCALE)),
        Option("result_ttl", non_negative_int, 604_800, "seconds a job's result is kept (0 = forever)",
               (BALANCE, UP, WORKER, AUTOSCALE)),
        Option("max_deliveries", positive_int, 3, "times a job is delivered without a result before it fails",
               (UP, WORKER, AUTOSCALE)),
        Option("redis_dir", text, "var/redis", "folder of the queue's Redis data: its append-only file",
               (REDIS, UP), {UP: None}),
        Option("heartbeat_ttl", positive_float, 3.0,
               "seconds a worker's heartbeat lives; a worker silent for longer loses its jobs to the others",
               (UP, WORKER, AUTOSCALE)),
        # autoscaling
        Option("autoscale", min_max, None, "MIN:MAX: 'imgclass up' sizes the workers or servers to the load",
               (UP,)),
        Option("autoscale_policy", _SCALING, "slo", "scaling policy: {choices}", (UP, AUTOSCALE),
               role_flags={AUTOSCALE: "--policy"}),
        Option("scale_min", positive_int, 1, "fewest workers or servers", (AUTOSCALE,),
               role_flags={AUTOSCALE: "--min"}),
        Option("scale_max", positive_int, 8, "most workers or servers", (AUTOSCALE,),
               role_flags={AUTOSCALE: "--max"}),
        Option("scale_interval", positive_float, 2.0, "seconds between two evaluations of the autoscaler",
               (UP, AUTOSCALE), role_flags={AUTOSCALE: "--interval"}),
        Option("per_worker", positive_float, 5.0, "queue_depth policy: jobs in the queue per worker", (UP, AUTOSCALE)),
        Option("target_load", positive_float, 2.0, "target policy: requests in flight or queued per worker",
               (UP, AUTOSCALE), role_flags={AUTOSCALE: "--target"}),
        Option("tolerance", non_negative_float, 0.1, "target policy: no change within this share of the target; "
               "slo policy: scale down only to a pool that also fits a rate this share higher", (UP, AUTOSCALE)),
        Option("upscale_delay", non_negative_float, 30.0,
               "target policy: seconds of steady demand before scaling up (Ray Serve's upscale_delay_s)",
               (UP, AUTOSCALE)),
        Option("downscale_window", non_negative_float, 300.0,
               "queue_depth and target policies: scaling down takes the highest recommendation of this many "
               "seconds (the HPA's 300, which KEDA uses; 0 = none)",
               (UP, AUTOSCALE)),
        Option("slo_ms", positive_float, 500.0, "slo policy: the latency objective, in ms", (UP, AUTOSCALE)),
        Option("slo_downscale_window", non_negative_float, 30.0,
               "slo policy: scaling down takes the highest size of this many seconds (its rates are smoothed "
               "already)", (UP, AUTOSCALE)),
        Option("slo_quantile", fraction, 0.95,
               "slo policy: size for this quantile of the time in system (0 = for the mean)", (UP, AUTOSCALE)),
        Option("headroom", positive_float, 1.25, "slo policy: size for slo-ms divided by this", (UP, AUTOSCALE)),
        Option("rate_window", positive_float, 10.0, "seconds over which arrival and service rates are smoothed",
               (UP, AUTOSCALE), role_flags={AUTOSCALE: "--window"}),
        Option("balancer_url", url, None, "push mode: the balancer whose servers the autoscaler sizes",
               (AUTOSCALE,), role_flags={AUTOSCALE: "--balancer"}),
        Option("actuator", choice("local", "testbed"), "local",
               "where the autoscaler starts workers or servers: local processes, or testbed (the --cluster's "
               "server nodes, over SSH)", (AUTOSCALE,)),
        Option("ssh_key", text, None, "testbed actuator: SSH private key for the nodes", (AUTOSCALE,)),
        Option("known_hosts", text, None, "testbed actuator: known_hosts file for the nodes' host keys "
               "(default ~/.ssh/known_hosts)", (AUTOSCALE,)),
        Option("remote_dir", text, "imgclass", "testbed actuator: the project folder on each node, as deploy "
               "made it (relative to the login's home)", (AUTOSCALE,)),
        # local cluster
        Option("servers", positive_int, 3, "number of model servers 'imgclass up' starts", (UP,)),
        Option("workers", positive_int, 2, "number of queue workers 'imgclass up --dispatch queue' starts", (UP,)),
    ]
}  # fmt: skip


def options_for(role: str) -> list[str]:
    """The names of the options `role` takes, in table order."""
    return [name for name, option in OPTIONS.items() if role in option.roles]


def _env_value(option: Option, environ: Mapping[str, str], role: str | None) -> Any:
    raw = environ.get(option.env)
    if raw is None or raw == "":
        return option.default_for(role)
    try:
        return option.parse(raw)
    except (ValueError, ConfigError) as exc:
        raise ConfigError(f"{option.env}={raw!r} is invalid: {exc}. Fix or unset that variable.") from exc


def resolved_default(name: str, role: str | None = None) -> Any:
    """The option's value when no flag is given: its IMGCLASS_* variable, else the table's default."""
    return _env_value(OPTIONS[name], os.environ, role)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(f"{message}. Run with --help to see the options.")


def add_options(
    parser: argparse.ArgumentParser,
    names: Iterable[str],
    role: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> None:
    """Add the named options; defaults come from the env var, else the table (for `role`)."""
    environ = os.environ if environ is None else environ
    for name in names:
        option = OPTIONS[name]
        default = _env_value(option, environ, role)

        def typed(value: str, _option: Option = option) -> Any:
            try:
                return _option.parse(value)
            except (ValueError, ConfigError) as exc:
                raise argparse.ArgumentTypeError(str(exc)) from exc

        typed.__name__ = option.parse.__name__
        parser.add_argument(
            option.flag_for(role),
            dest=name,
            type=typed,
            default=default,
            help=f"{option.describe()} [env {option.env}; default {option.default_for(role)!r}]",
        )


def add_role_options(parser: argparse.ArgumentParser, role: str, skip: Sequence[str] = ()) -> None:
    add_options(parser, [n for n in options_for(role) if n not in skip], role)


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
