"""Engine mode's haproxy.cfg: each policy's balance line, the settings in the file, and `haproxy -c` on every combination."""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from imgclass import log
from imgclass.balancing.haproxy import config as cfg
from imgclass.balancing.haproxy.membership import Member, Membership
from imgclass.balancing.haproxy.runtime import RuntimeAPI
from imgclass.balancing.policies import POLICIES
from imgclass.balancing.settings import BalancerSettings
from imgclass.errors import EngineUnavailable

from .haproxy_support import require_haproxy

BALANCE = {"random": "random(1)", "round_robin": "roundrobin", "least_outstanding": "leastconn", "p2c": "random(2)"}


@pytest.fixture
def public() -> Iterator[socket.socket]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    yield sock
    sock.close()


def rendered(settings: BalancerSettings, directory: Path, fd: int, slots: int = 4) -> tuple[cfg.Layout, str]:
    layout = cfg.Layout(directory, fd, slots)
    lines = [cfg.SlotLine("127.0.0.1", 5001, True), cfg.SlotLine("::1", 5002, True), cfg.SlotLine("10.0.0.9", 5003)]
    lines = (lines + [cfg.SlotLine()] * slots)[:slots]
    text = cfg.render(settings, layout, lines)
    layout.cfg.write_text(text)
    cfg.write_map(layout.backend_map, {cfg.server_name(i): "-" for i in range(slots)})
    cfg.write_map(layout.prefix_map, {"count": "0", **{str(k): "0" for k in range(1, slots + 1)}})
    return layout, text


def section(text: str, name: str) -> str:
    return text.split(f"\nbackend {name}\n", 1)[1].split("\n\n", 1)[0]


def test_every_policy_has_a_balance_line() -> None:
    assert cfg.policies() == list(POLICIES)


@pytest.mark.parametrize("policy", list(BALANCE))
def test_each_policy_maps_to_its_balance_line(policy: str, tmp_path: Path) -> None:
    _, text = rendered(BalancerSettings.make(policy=policy), tmp_path, 3)
    # the default policy's backend over every slot, and every per-request backend of that policy
    for j in range(1, 5):
        assert f"    balance {BALANCE[policy]}\n" in section(text, f"{policy}.{j}") + "\n"
    main = section(text, f"{policy}.4")
    assert "    option httpchk" in main and "uri /readyz" in main and "track" not in main
    other = next(p for p in BALANCE if p != policy)
    assert f"track {policy}.4/s1" in section(text, f"{other}.2")


def test_the_settings_reach_the_file(tmp_path: Path) -> None:
    settings = BalancerSettings.make(health_interval=0.5, fall=4, rise=3, timeout=12.0, connect_timeout=0.7,
                                     max_conn=2, queue_size=7, queue_timeout=3.0, max_upload_mb=5.0,
                                     haproxy_threads=2)  # fmt: skip
    _, text = rendered(settings, tmp_path, 3)
    assert "nbthread 2" in text
    assert "timeout connect 700ms" in text and "timeout server 12000ms" in text and "timeout queue 3000ms" in text
    assert "retry-on conn-failure empty-response\n" in text and "option redispatch 1" in text
    main = section(text, "random.4")
    assert "inter 500ms fall 4 rise 3" in main and "maxconn 2" in main
    # shedding is not failure: connection errors mark a server down, a 503 never does
    assert "observe layer4" in main and "layer7" not in text
    assert "if { queue() ge 7 }" in main and '"error":"queue_full"' in main
    assert "gt 5065536" in text  # --max-upload-mb plus the envelope web.app allows
    for status in (400, 408, 413, 500, 502, 503, 504):
        body = re.search(rf"http-error status {status} content-type application/json.*? string '(.*)'", text)
        assert body is not None and set(json.loads(body.group(1))) == {"error", "message"}
    assert re.search(r"http-error status 503 .*hdr Retry-After 1 .*queue_timeout", text)


def test_try_timeout_is_the_server_timeout_and_retries(tmp_path: Path) -> None:
    _, text = rendered(BalancerSettings.make(try_timeout=1.5), tmp_path, 3)
    assert "timeout server 1500ms" in text and "retry-on conn-failure empty-response response-timeout" in text


def test_a_policy_haproxy_lacks_is_refused(tmp_path: Path) -> None:
    with pytest.raises(EngineUnavailable, match="no HAProxy equivalent"):
        rendered(BalancerSettings.make(policy="fastest"), tmp_path, 3)


# Every policy with and without --max-conn and --try-timeout, one slot or eight, and two threads with
# HAProxy's request log (--log-level debug) against one thread without.
COMBINATIONS = list(itertools.product(BALANCE, (0, 2), (0.0, 1.5), (1, 8), ((1, "INFO"), (2, "DEBUG"))))


@pytest.mark.parametrize(("policy", "max_conn", "try_timeout", "slots", "threads_and_log"), COMBINATIONS)
def test_haproxy_accepts_the_file(policy: str, max_conn: int, try_timeout: float, slots: int,
                                  threads_and_log: tuple[int, str], tmp_path: Path, public: socket.socket) -> None:  # fmt: skip
    binary = require_haproxy()
    threads, log_level = threads_and_log
    settings = BalancerSettings.make(policy=policy, max_conn=max_conn, try_timeout=try_timeout, haproxy_threads=threads,
                                     log_level=log_level)  # fmt: skip
    layout, _ = rendered(settings, tmp_path, public.fileno(), slots)
    cfg.validate(binary, layout)  # raises EngineUnavailable with haproxy's words


def test_a_refused_file_is_reported_with_haproxys_words(tmp_path: Path, public: socket.socket) -> None:
    binary = require_haproxy()
    layout, text = rendered(BalancerSettings.make(), tmp_path, public.fileno())
    layout.cfg.write_text(text.replace("    balance random(1)", "    balance fastest", 1))
    with pytest.raises(EngineUnavailable, match="balance only supports"):
        cfg.validate(binary, layout)


def test_the_prefix_map_counts_members_in_slot_order(tmp_path: Path) -> None:
    layout = cfg.Layout(tmp_path, 3, 5)
    members = Membership(BalancerSettings.make(), layout, RuntimeAPI(layout.stats_socket), asyncio.Lock(),
                         log.get_logger("t", "test"))  # fmt: skip
    members.slots = [Member("http://a:1", "10.0.0.1", 1, 0), None, Member("http://b:1", "10.0.0.2", 1, 2, draining=True),
                     Member("http://c:1", "10.0.0.3", 1, 3), None]  # fmt: skip
    # k=2 needs the first four slots: the second is free and the third drains
    assert members.prefixes() == {"count": "2", "1": "1", "2": "4", "3": "0", "4": "0", "5": "0"}
    assert members.urls() == {"s1": "http://a:1", "s2": "-", "s3": "http://b:1", "s4": "http://c:1", "s5": "-"}
    assert [line.enabled for line in members.lines()] == [True, False, False, True, False]
