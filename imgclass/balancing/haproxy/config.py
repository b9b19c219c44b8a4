"""haproxy.cfg rendered from the balancer's settings and its server slots, and checked with `haproxy -c`.

Every policy gets one backend per prefix length j (the first j slots): `number_backend_servers=k`
and `policy=` pick one by name, through a map that the control plane keeps at run time. The
backend of the default policy over every slot is the primary: its servers run the health checks,
and every other backend's servers `track` them, so a server's state is set in one place.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ...errors import (
    BadParameter,
    EngineUnavailable,
    ImgclassError,
    NoBackendAvailable,
    QueueFull,
    QueueTimeout,
    RequestError,
    RequestTimeout,
    UpstreamError,
    UpstreamTimeout,
    unexpected,
)
from ...web.app import REQUEST_ID_PATTERN, Limits, too_large
from ...web.server import ServerOptions
from ..policies import POLICIES
from ..settings import BalancerSettings

# Each policy of the Python engine as HAProxy's `balance` line. random(1) is one uniform draw;
# HAProxy's plain `random` is random(2), the power of two choices.
BALANCE = {"random": "random(1)", "round_robin": "roundrobin", "least_outstanding": "leastconn", "p2c": "random(2)"}

# What HAProxy forwards to the model servers; everything else goes to the control plane's app.
FORWARDED_PATHS = ("/submit", "/predict")
FORWARDED_PATTERN = r"^/v[12]/models/[^/]+(/versions/[^/]+)?(/infer|:predict)$"
EXPORTER_PATH = "/haproxy/metrics"  # HAProxy's own Prometheus exporter, beside our /metrics
COUNTED = ("no_backend", "queue_full")  # refusals counted in proc.* variables (see _counted)

# L7 retries (empty-response, response-timeout) replay a request only if it fits in one buffer
# (HAProxy's retry-on): 64 KB holds the ~40 KB photos the benchmarks send, with their headers.
# A larger upload is retried only when its connection failed, before anything was sent.
BUFSIZE = 65536
# A fresh X-Request-ID: the process, its start time and its request counter, in hex (a plain token).
UNIQUE_ID = "%{+X}o%pid%Ts%rt"
RETRY_AFTER_S = 1  # what the Python engine's own 503s advise
MAX_WEIGHT = 256
NO_ADDRESS = "0.0.0.0:0"  # an empty slot: HAProxy needs some address, and a disabled server never uses it


@dataclass(frozen=True)
class Layout:
    """Where one engine's files and sockets live, and how many server slots it declares."""

    directory: Path
    public_fd: int  # the public listening socket, bound by the control plane and inherited (fd@)
    slots: int

    @property
    def cfg(self) -> Path:
        return self.directory / "haproxy.cfg"

    @property
    def stats_socket(self) -> Path:
        return self.directory / "admin.sock"

    @property
    def control_socket(self) -> Path:
        return self.directory / "control.sock"

    @property
    def backend_map(self) -> Path:
        """slot server name -> model server URL, for X-Backend."""
        return self.directory / "backends.map"

    @property
    def prefix_map(self) -> Path:
        """number_backend_servers k -> the prefix j of slots that holds k members; 'count' -> members."""
        return self.directory / "prefixes.map"


@dataclass(frozen=True)
class SlotLine:
    """One pre-declared server slot as haproxy.cfg declares it."""

    address: str | None = None  # an IP address; None for an empty slot
    port: int = 0
    enabled: bool = False  # takes traffic (once its checks pass); False: declared in maintenance


def policies() -> list[str]:
    """The Python engine's policies that HAProxy has a `balance` line for."""
    return [name for name in POLICIES if name in BALANCE]


def backend_name(policy: str, prefix: int) -> str:
    return f"{policy}.{prefix}"


def server_name(slot: int) -> str:
    return f"s{slot + 1}"


def primary(settings: BalancerSettings, layout: Layout) -> str:
    return backend_name(settings.policy, layout.slots)


def server_address(address: str | None, port: int) -> str:
    if address is None:
        return NO_ADDRESS
    return f"ipv6@{address}:{port}" if ipaddress.ip_address(address).version == 6 else f"{address}:{port}"


def _ms(seconds: float) -> str:
    return f"{max(1, round(seconds * 1000))}ms"


def _body(error: ImgclassError) -> str:
    """The JSON error as HAProxy sends it: within single quotes, which take anything but a quote."""
    text = json.dumps(error.to_json(), separators=(",", ":"))
    assert "'" not in text and "%" not in text, text
    return text


def _reply(status: int, error: ImgclassError, retry_after: bool = False) -> str:
    extra = f" hdr Retry-After {RETRY_AFTER_S}" if retry_after else ""
    return f"status {status} content-type application/json{extra} string '{_body(error)}'"


def render(settings: BalancerSettings, layout: Layout, slots: Sequence[SlotLine]) -> str:
    """The whole haproxy.cfg for these settings and slot assignments."""
    assert len(slots) == layout.slots
    if settings.policy not in BALANCE:
        raise EngineUnavailable(f"--policy {settings.policy} has no HAProxy equivalent; choose one of "
                                f"{', '.join(policies())} with --engine haproxy.")  # fmt: skip
    sections = [_global(settings, layout), _defaults(settings), _frontend(settings, layout), _control(layout)]
    sections += [_backend(settings, layout, slots, policy, j) for policy in policies() for j in range(1, layout.slots + 1)]
    return "\n".join(line for section in sections for line in [*section, ""])


def _global(settings: BalancerSettings, layout: Layout) -> list[str]:
    lines = [
        "global",
        "    master-worker",
        f"    nbthread {settings.haproxy_threads}",
        f"    stats socket {layout.stats_socket} mode 600 level admin",
        f"    hard-stop-after {round(ServerOptions().graceful_s)}s",  # SIGTERM drains for as long as uvicorn's
        f"    tune.bufsize {BUFSIZE}",
        # Per-task CPU accounting: "auto" turns it on under load, when it costs most, for a profile
        # that engine mode never reads.
        "    profiling.tasks off",
    ]
    if settings.log_level == "DEBUG":
        lines.append("    log stderr format raw daemon")  # one line per request, relayed into our log
    return lines


def _defaults(settings: BalancerSettings) -> list[str]:
    limits = Limits(max_upload=settings.max_upload_bytes)
    # --try-timeout, when set, is the longest silence of one try, retried once elsewhere (as the
    # Python engine's); HAProxy has one server timeout, so it stands in for --timeout then.
    server_timeout = settings.try_timeout or settings.timeout
    retry_on = "conn-failure empty-response" + (" response-timeout" if settings.try_timeout else "")
    no_server = (QueueTimeout(f"Waited {settings.queue_timeout:g} s at the balancer without a free model server; "
                              "retry shortly.") if settings.max_conn
                 else NoBackendAvailable("No model server could take the request; retry shortly."))  # fmt: skip
    errors = [
        (400, RequestError("The request is not valid HTTP; check its request line and headers."), False),
        (408, RequestTimeout(f"The request did not arrive within {limits.read_timeout_s:g} s; send it again."), False),
        (413, too_large(settings.max_upload_bytes), False),
        (500, unexpected(), False),
        (502, UpstreamError("The model server failed to answer; retry shortly."), False),
        (503, no_server, True),
        (504, UpstreamTimeout(f"The model server did not answer within {server_timeout:g} s."), False),
    ]
    return [
        "defaults",
        "    mode http",
        *(["    log global", "    option httplog"] if settings.log_level == "DEBUG" else []),
        f"    timeout connect {_ms(settings.connect_timeout)}",
        f"    timeout client {_ms(limits.read_timeout_s)}",  # nginx's client_body_timeout, as web.app's
        f"    timeout http-request {_ms(limits.read_timeout_s)}",
        f"    timeout http-keep-alive {_ms(ServerOptions().keep_alive_s)}",
        f"    timeout server {_ms(server_timeout)}",
        f"    timeout queue {_ms(settings.queue_timeout)}",
        f"    timeout check {_ms(min(2.0, max(0.2, settings.health_interval)))}",  # as the Python engine's checks
        # Nothing came back, so the server cannot have answered; classification is idempotent, so a
        # retry on another server (redispatch) is safe, as in the Python engine.
        "    retries 1",
        # A request is replayed only if it is whole in the buffer: wait for the body (up to BUFSIZE) first.
        "    option http-buffer-request",
        f"    retry-on {retry_on}",
        "    option redispatch 1",
        # Idle connections to the model servers serve any client's request, as nginx's keepalive pool
        # does ("safe" gives each client connection's first request a new one: one connect in ten here).
        # A server that closes an idle one just then costs an empty response, retried above.
        "    http-reuse always",
        # A client that leaves frees its place in the queue, and its server connection is closed.
        "    option abortonclose",
        *(f"    http-error {_reply(status, error, retry)}" for status, error, retry in errors),
    ]


def _frontend(settings: BalancerSettings, layout: Layout) -> list[str]:
    names = policies()
    bad_policy = BadParameter(f"policy must be one of {', '.join(names)} in engine mode (a query parameter).")
    count = f"%[str(count),map({layout.prefix_map})]"
    bad_prefix = ('{"error":"bad_parameter","message":"number_backend_servers must be a whole number from 1 to '
                  f"{count} (the backends this balancer has), not %[url_param(number_backend_servers),json(utf8s)]."
                  '"}')  # fmt: skip
    max_body = Limits(max_upload=settings.max_upload_bytes).max_body
    main = primary(settings, layout)
    return [
        "frontend public",
        f"    bind fd@{layout.public_fd}",
        f"    unique-id-format {UNIQUE_ID}",
        # X-Request-ID: the client's if it is one plain token, else a fresh one (as web.app does)
        f"    acl request_id_ok req.fhdr(x-request-id) -m reg ^{REQUEST_ID_PATTERN.pattern}$",
        "    acl request_id_one req.fhdr_cnt(x-request-id) eq 1",
        "    http-request set-header X-Request-ID %[unique-id] unless request_id_one request_id_ok",
        "    http-request set-var(txn.rid) req.fhdr(x-request-id)",
        "    http-after-response set-header X-Request-ID %[var(txn.rid)]",  # HAProxy's own answers too
        # Content-Length is checked before anything is read; a chunked upload, by the model server.
        f"    http-request deny deny_status 413 content-type application/json string '{_body(too_large(settings.max_upload_bytes))}' "
        f"if {{ req.hdr_val(content-length) gt {max_body} }}",
        f"    http-request use-service prometheus-exporter if {{ path {EXPORTER_PATH} }}",
        f"    acl forwarded path {' '.join(FORWARDED_PATHS)}",
        f"    acl forwarded path_reg {FORWARDED_PATTERN}",
        "    http-request set-path /predict if { path /submit }",  # the model server's route
        # Per-request options (policy=, number_backend_servers=) come in the query: a request without
        # one goes to the primary backend, and the rules below cost it one look for a '?'.
        "    acl with_query query -m found",
        "    acl policy_given url_param(policy) -m found",
        f"    acl policy_known url_param(policy) -m str {' '.join(names)}",
        "    acl prefix_given url_param(number_backend_servers) -m found",
        "    acl prefix_digits url_param(number_backend_servers) -m reg ^[0-9]{1,4}$",
        f"    http-request return {_reply(400, bad_policy)} if with_query policy_given !policy_known forwarded",
        "    http-request set-var(txn.policy) url_param(policy) if with_query policy_given forwarded",
        # k -> the prefix of slots holding k members; 0 for a k out of range (the map's default too)
        f"    http-request set-var(txn.prefix) url_param(number_backend_servers),map_str_int({layout.prefix_map},0) "
        "if with_query prefix_given prefix_digits forwarded",
        "    http-request return status 400 content-type application/json "
        f"lf-string '{bad_prefix}' if with_query prefix_given forwarded !{{ var(txn.prefix) -m int gt 0 }}",
        f"    use_backend {main} if forwarded !with_query",
        f"    use_backend %[var(txn.policy,{settings.policy})].%[var(txn.prefix,{layout.slots})] if forwarded",
        "    default_backend control",
    ]


def _control(layout: Layout) -> list[str]:
    """The control plane's app: the page, /backends, /metrics, the admin API, on a private socket."""
    return ["backend control", f"    server control unix@{layout.control_socket}"]


def _backend(settings: BalancerSettings, layout: Layout, slots: Sequence[SlotLine], policy: str, j: int) -> list[str]:
    name = backend_name(policy, j)
    main = primary(settings, layout)
    no_backend = NoBackendAvailable("No healthy model server is available; retry shortly.")
    lines = [
        f"backend {name}",
        f"    balance {BALANCE[policy]}",
        f"    http-response set-header X-Backend %[srv_name,map({layout.backend_map})]",  # the URL, as the Python engine's
        *_counted("no_backend", "nbsrv() eq 0"),
        f"    http-request return {_reply(503, no_backend, True)} if {{ nbsrv() eq 0 }}",
    ]
    if settings.max_conn:
        full = QueueFull(f"All {settings.max_conn}-request slots are busy and {settings.queue_size} requests are "
                         "queued; retry shortly.")  # fmt: skip
        lines += _counted("queue_full", f"queue() ge {settings.queue_size}")
        lines.append(f"    http-request deny {_reply(503, full, True)} if {{ queue() ge {settings.queue_size} }}")
    # random draws a point on a hash ring where each server holds points in proportion to its weight:
    # at weight 1 the arcs are few and unequal (a server got 41% of the requests of three, not 33%),
    # at the largest weight, 256, the shares are even.
    common = f" weight {MAX_WEIGHT}" + (f" maxconn {settings.max_conn}" if settings.max_conn else "")
    if name == main:
        # Active checks on /readyz, and a connection error marks a server down at once until --rise
        # checks pass. Layer 4 only: a 503 is shedding, never a failure (observe layer7 would count it).
        lines += [
            "    option httpchk",
            "    http-check send meth GET uri /readyz",
            "    http-check expect status 200",
            f"    default-server check inter {_ms(settings.health_interval)} fall {settings.fall} rise {settings.rise} "
            f"observe layer4 error-limit 1 on-error mark-down{common}",
        ]
        for slot, line in enumerate(slots):
            disabled = "" if line.enabled and line.address else " disabled"
            lines.append(f"    server {server_name(slot)} {server_address(line.address, line.port)}{disabled}")
    else:
        lines.append(f"    default-server{common}")
        for slot, line in enumerate(slots[:j]):
            address = server_address(line.address, line.port)
            lines.append(f"    server {server_name(slot)} {address} track {main}/{server_name(slot)}")
    return lines


def _counted(name: str, condition: str) -> list[str]:
    """Count a refusal in a process-wide variable that the runtime API reads (`get var`): HAProxy's
    stats count neither `http-request return` nor one deny apart from another."""
    return [f"    http-request set-var(proc.{name}) var(proc.{name},0),add(1) if {{ {condition} }}"]


def write_map(path: Path, entries: dict[str, str]) -> None:
    path.write_text("".join(f"{key} {value}\n" for key, value in entries.items()))


def validate(binary: str, layout: Layout) -> None:
    """`haproxy -c` on the rendered file, with the public socket it will inherit."""
    proc = subprocess.run([binary, "-c", "-f", str(layout.cfg)], capture_output=True, text=True, timeout=60,
                          pass_fds=(layout.public_fd,))  # fmt: skip
    if proc.returncode != 0:
        lines = [line for line in (proc.stdout + proc.stderr).splitlines() if "ALERT" in line or "error" in line.lower()]
        raise EngineUnavailable(f"haproxy -c refused the rendered {layout.cfg}: {' / '.join(lines[:3]) or proc.returncode}"
                                "; this is a bug in engine mode, please report it with that file.")  # fmt: skip
