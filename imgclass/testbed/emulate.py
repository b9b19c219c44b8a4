"""An emulated slice: the RSpec's nodes as network namespaces, its links as shaped veth pairs."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import threading
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .. import config
from ..errors import ConfigError, ImgclassError
from ..process import Child, ChildFailed, stop_all
from .inventory import BALANCER_PORT, SERVER_PORT, local_name, role_of
from .topology import Endpoint, Link, Node, Topology


class EmulationError(ImgclassError):
    code = "emulation_error"


@dataclass(frozen=True)
class Shaping:
    """Per-link shaping: tbf for bandwidth; netem for delay and loss, where the kernel has it."""

    rate: str | None = "100mbit"
    delay: str | None = None
    loss: float = 0.0

    @property
    def wants_netem(self) -> bool:
        return bool(self.delay) or self.loss > 0


def topology_from_rspec(xml_text: str) -> Topology:
    """Nodes, interfaces, addresses and links of a request (or manifest) RSpec."""
    try:
        root = ET.fromstring(xml_text)
    except ET.ParseError as exc:
        raise ConfigError(f"the RSpec is not valid XML ({exc}).") from exc
    nodes: list[Node] = []
    addresses: dict[str, tuple[str, str, str]] = {}  # interface client_id -> (node, ifname, ip)
    links: list[Link] = []
    for element in root:
        tag = local_name(element.tag)
        if tag == "node":
            name = element.get("client_id", "")
            nodes.append(Node(name, role_of(name)))
            for iface in element:
                if local_name(iface.tag) != "interface":
                    continue
                ip = next((c.get("address") for c in iface if local_name(c.tag) == "ip"), None)
                client_id = iface.get("client_id", "")
                if ip:
                    addresses[client_id] = (name, client_id.split(":", 1)[-1], ip)
        elif tag == "link":
            refs = [r.get("client_id", "") for r in element if local_name(r.tag) == "interface_ref"]
            if len(refs) != 2 or not all(r in addresses for r in refs):
                raise ConfigError(f"link {element.get('client_id')} must join two interfaces with IPv4 addresses.")
            (na, ia, aa), (nb, ib, ab) = addresses[refs[0]], addresses[refs[1]]
            links.append(
                Link(element.get("client_id", f"link{len(links) + 1}"), Endpoint(na, ia, aa), Endpoint(nb, ib, ab))
            )
    if not any(n.role == "balancer" for n in nodes):
        raise ConfigError("the RSpec has no node named 'balancer'.")
    return Topology(tuple(nodes), tuple(links))


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise EmulationError(f"'{shlex.join(cmd)}' failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def netem_available() -> bool:
    """True where the kernel has sch_netem (this sandbox's does not)."""
    probe = f"icnetem{os.getpid() % 10000}"
    try:
        _run("ip", "link", "add", probe, "type", "dummy")
    except EmulationError:
        return False
    try:
        return subprocess.run(["tc", "qdisc", "add", "dev", probe, "root", "netem", "delay", "1ms"],
                              capture_output=True, timeout=10).returncode == 0  # fmt: skip
    finally:
        subprocess.run(["ip", "link", "del", probe], capture_output=True, timeout=10)


class Slice:
    """Builds the topology, starts the roles in their namespaces, and always tears everything down."""

    def __init__(
        self,
        topology: Topology,
        shaping: Shaping,
        *,
        run_id: str | None = None,
        backend: str = "litert",
        service_time: str = "exp:20ms",
        model_dir: str | None = None,
        log: bool = True,
    ) -> None:
        self.topology = topology
        self.shaping = shaping
        self.id = run_id or f"ic{os.getpid() % 100000}"
        self.backend = backend
        self.service_time = service_time
        self.model_dir = model_dir or config.resolved_default("model_dir")
        self.log = log
        self.namespaces: list[str] = []
        self.children: list[Child] = []
        self.netem = False

    def ns(self, node: str) -> str:
        return f"{self.id}-{node}"

    def say(self, text: str) -> None:
        if self.log:
            print(f"emulate: {text}", file=sys.stderr, flush=True)

    @property
    def client_endpoint(self) -> Endpoint:
        return next(e for link in self.topology.links for e in (link.a, link.b)
                    if e.node == "balancer" and any(x.node == "client" for x in (link.a, link.b)))  # fmt: skip

    @property
    def balancer_url(self) -> str:
        return f"http://{self.client_endpoint.address}:{BALANCER_PORT}"

    def build(self) -> None:
        if os.geteuid() != 0:
            raise EmulationError("network namespaces need root: run it with sudo.")
        if self.shaping.wants_netem:
            self.netem = netem_available()
            if not self.netem:
                self.say("this kernel has no netem qdisc ('Specified qdisc kind is unknown'): "
                         "delay and loss are NOT applied; shaping bandwidth with tbf only")  # fmt: skip
        for node in self.topology.nodes:
            name = self.ns(node.name)
            _run("ip", "netns", "add", name)
            self.namespaces.append(name)
            _run("ip", "-n", name, "link", "set", "lo", "up")
        for link in self.topology.links:
            a, b = link.a, link.b
            _run("ip", "link", "add", "name", a.interface, "netns", self.ns(a.node), "type", "veth",
                 "peer", "name", b.interface, "netns", self.ns(b.node))  # fmt: skip
            for end in (a, b):
                ns = self.ns(end.node)
                _run("ip", "-n", ns, "addr", "add", f"{end.address}/24", "dev", end.interface)
                _run("ip", "-n", ns, "link", "set", end.interface, "up")
                self._shape(ns, end.interface)
        self.say(f"{len(self.topology.nodes)} namespaces, {len(self.topology.links)} links "
                 f"(rate {self.shaping.rate or 'unshaped'}"
                 f"{f', delay {self.shaping.delay}' if self.shaping.delay and self.netem else ''}"
                 f"{f', loss {self.shaping.loss}%' if self.shaping.loss and self.netem else ''})")  # fmt: skip

    def _shape(self, ns: str, dev: str) -> None:
        parent = ["root"]
        if self.netem:
            netem = ["netem"]
            if self.shaping.delay:
                netem += ["delay", self.shaping.delay]
            if self.shaping.loss:
                netem += ["loss", f"{self.shaping.loss}%"]
            _run("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "handle", "1:", *netem)
            parent = ["parent", "1:1", "handle", "10:"]
        if self.shaping.rate:
            # burst must cover a timer tick at this rate, or tbf cannot reach it
            _run("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, *parent, "tbf",
                 "rate", self.shaping.rate, "burst", "256kbit", "latency", "200ms")  # fmt: skip

    def start(self, threads: int = 1) -> str:
        env = {"IMGCLASS_MODEL_DIR": str(self.model_dir), "IMGCLASS_LOG_LEVEL": "WARNING"}
        servers = []
        for node in self.topology.servers():
            address = self.topology.endpoints(node.name)[0].address
            args = ["serve", "--host", address, "--port", str(SERVER_PORT), "--name", f"{self.id}-{node.name}",
                    "--backend", self.backend, "--service-time", self.service_time, "--threads", str(threads)]  # fmt: skip
            servers.append(Child(args, env=env, prefix=["ip", "netns", "exec", self.ns(node.name)]))
        self.children += servers
        backends = [c.wait_url() for c in servers]
        balancer = Child(["balance", "--host", "0.0.0.0", "--port", str(BALANCER_PORT), "--name", f"{self.id}-balancer",
                          "--backends", ",".join(backends)], env=env,
                         prefix=["ip", "netns", "exec", self.ns("balancer")])  # fmt: skip
        self.children.append(balancer)
        balancer.wait_url()
        return self.balancer_url

    def exec_in(self, node: str, command: Sequence[str], timeout: float | None = None) -> int:
        """Run a command in a node's namespace, in the foreground."""
        return subprocess.run(["ip", "netns", "exec", self.ns(node), *command], timeout=timeout).returncode

    def teardown(self) -> None:
        stop_all(self.children)
        self.children.clear()
        # deleting a namespace deletes the veth ends in it, and with them their peers
        for name in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
        self.namespaces.clear()


def main(argv: Sequence[str]) -> int:
    parser = config.make_parser("imgclass testbed emulate", "Run the RSpec's topology in network namespaces here.")
    parser.add_argument("--rspec", default="image_class.rspec", help="request RSpec [default image_class.rspec]")
    parser.add_argument(
        "--rate", default="100mbit", help="tbf rate per link and direction, or 'none' [default 100mbit]"
    )
    parser.add_argument("--delay", default="2ms", help="netem delay per link, where netem exists [default 2ms]")
    parser.add_argument("--loss", type=float, default=0.0, help="netem loss %% per link, where netem exists")
    config.add_options(parser, ["backend"], config.SERVE)
    parser.add_argument("--service-time", default="exp:20ms", help="sleep backend service times")
    parser.add_argument("--threads", type=int, default=1, help="inference threads per server [default 1]")
    parser.add_argument("--id", help="prefix of namespace names [default ic<pid>]")
    parser.add_argument(
        "--run", help="run this command in the client namespace, then tear down and exit with its status"
    )
    args = parser.parse_args(argv)
    try:
        topology = topology_from_rspec(Path(args.rspec).read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read --rspec {args.rspec!r} ({exc.strerror}).") from exc
    rate = None if args.rate.lower() in ("none", "0", "") else args.rate
    delay = None if args.delay.lower() in ("none", "0", "0ms", "") else args.delay
    em = Slice(topology, Shaping(rate, delay, args.loss), run_id=args.id, backend=args.backend,
               service_time=args.service_time)  # fmt: skip
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        em.build()
        url = em.start(args.threads)
        print(f"emulated slice up: balancer at {url} (namespace {em.ns('balancer')}); from the client:", flush=True)
        print(f"  ip netns exec {em.ns('client')} {sys.executable} test_rtt.py --url {url}", flush=True)
        if args.run:
            return em.exec_in("client", shlex.split(args.run))
        print("Ctrl-C tears it all down.", flush=True)
        while not stop.wait(0.5):
            if any(not c.alive() for c in em.children):
                print("emulate: a role exited; tearing down", file=sys.stderr)
                return 1
        return 0
    except ChildFailed as exc:
        print(f"emulate: {exc}", file=sys.stderr)
        return 1
    finally:
        em.teardown()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        print("emulate: torn down", file=sys.stderr, flush=True)
