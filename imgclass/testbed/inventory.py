"""The cluster file (cluster.json): each node's role, control host, SSH user and data-plane addresses."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

from ..errors import ConfigError

SERVER_PORT = 5001
BALANCER_PORT = 5000


def local_name(tag: str) -> str:
    """An XML tag without its namespace."""
    return tag.rsplit("}", 1)[-1]


def role_of(node_name: str) -> str:
    """The role a node plays, from its client_id in image_class.rspec."""
    if node_name.startswith("server"):
        return "server"
    return node_name if node_name in ("balancer", "client") else "other"


def read_cluster(path: str) -> dict:
    """cluster.json, or a ConfigError that says how to make it."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read cluster file {path!r} ({exc}); make it with 'imgclass testbed hosts'.") from exc


def cluster_from_manifest(xml_text: str, server_port: int = SERVER_PORT, balancer_port: int = BALANCER_PORT) -> dict:
    """Role, name, control host/port, SSH user and data-plane addresses of each node in a manifest."""
    try:
        root = ET.fromstring(xml_text)
    except ET.ParseError as exc:
        raise ConfigError(f"the manifest is not valid XML ({exc}); save it from the portal again.") from exc
    nodes = []
    for node in root:
        if local_name(node.tag) != "node":
            continue
        name = node.get("client_id", "")
        role = role_of(name)
        entry: dict[str, object] = {"role": role, "name": name}
        addresses = []
        for child in node.iter():
            tag = local_name(child.tag)
            if tag == "login" and "control_host" not in entry:
                entry["control_host"] = child.get("hostname")
                entry["control_port"] = int(child.get("port", "22"))
                if child.get("username"):
                    entry["user"] = child.get("username")
            elif tag == "host" and child.get("name"):
                entry.setdefault("hostname", child.get("name"))
            elif tag == "ip" and child.get("address"):
                addresses.append(child.get("address"))
        if "control_host" not in entry and "hostname" in entry:
            entry["control_host"], entry["control_port"] = entry["hostname"], 22
        entry["data_ips"] = addresses
        if role == "server":
            entry["data_ip"] = addresses[0] if addresses else None
            entry["service_port"] = server_port
        elif role == "balancer":
            entry["service_port"] = balancer_port
        nodes.append(entry)
    if not any(n["role"] == "balancer" for n in nodes):
        raise ConfigError("the manifest has no node named 'balancer'; was it made from image_class.rspec?")
    return {"nodes": nodes}


def balancer_url_from_cluster(path: str) -> str:
    """The balancer's control-network URL, for running the experiments from outside the slice."""
    for node in read_cluster(path).get("nodes", []):
        if node.get("role") == "balancer":
            return f"http://{node['control_host']}:{node.get('service_port', BALANCER_PORT)}"
    raise ConfigError(f"{path} has no node with role 'balancer'.")


def backends_from_cluster(path: str) -> list[str]:
    """The model servers' data-plane URLs, for `load_balancer.py --cluster cluster.json`."""
    doc = read_cluster(path)
    urls = [
        f"http://{n['data_ip']}:{n.get('service_port', SERVER_PORT)}"
        for n in doc.get("nodes", [])
        if n.get("role") == "server" and n.get("data_ip")
    ]
    if not urls:
        raise ConfigError(f"--cluster {path!r} lists no server with a data_ip.")
    return urls
