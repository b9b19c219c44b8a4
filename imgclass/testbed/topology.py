"""The testbed topology as data: a balancer, N servers and a client, with point-to-point links."""

from __future__ import annotations

from dataclasses import dataclass

NETMASK = "255.255.255.0"


@dataclass(frozen=True)
class Endpoint:
    node: str
    interface: str  # e.g. "if1"
    address: str  # IPv4 on the link's /24


@dataclass(frozen=True)
class Link:
    name: str
    a: Endpoint
    b: Endpoint


@dataclass(frozen=True)
class Node:
    name: str
    role: str  # balancer, server or client


@dataclass(frozen=True)
class Topology:
    nodes: tuple[Node, ...]
    links: tuple[Link, ...]

    def node(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)

    def endpoints(self, node: str) -> list[Endpoint]:
        return [e for link in self.links for e in (link.a, link.b) if e.node == node]

    def servers(self) -> list[Node]:
        return [n for n in self.nodes if n.role == "server"]


def star(servers: int) -> Topology:
    """The original topology: link k joins server k (10.10.k.1) and the balancer (10.10.k.2);
    link N+1 joins the client (10.10.(N+1).1) and the balancer (10.10.(N+1).2)."""
    if not 1 <= servers <= 250:
        raise ValueError("servers must be between 1 and 250 (one 10.10.k.0/24 per link)")
    nodes = [Node("balancer", "balancer")]
    nodes += [Node(f"server{k}", "server") for k in range(1, servers + 1)]
    nodes.append(Node("client", "client"))
    links = [
        Link(f"link{k}", Endpoint(f"server{k}", "if1", f"10.10.{k}.1"), Endpoint("balancer", f"if{k}", f"10.10.{k}.2"))
        for k in range(1, servers + 1)
    ]
    c = servers + 1
    links.append(
        Link(f"link{c}", Endpoint("client", "if1", f"10.10.{c}.1"), Endpoint("balancer", f"if{c}", f"10.10.{c}.2"))
    )
    return Topology(tuple(nodes), tuple(links))
