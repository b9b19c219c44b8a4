"""Testbed: a GENI v3 request RSpec from the topology (geni-lib), and cluster.json from a manifest."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

from . import config
from .errors import ConfigError
from .topology import NETMASK, Topology, star

DEFAULT_SERVERS = 4
# Ubuntu 22.04 on CloudLab/Emulab clusters; override with --image.
DEFAULT_IMAGE = "urn:publicid:IDN+emulab.net+image+emulab-ops//UBUNTU22-64-STD"
SERVER_PORT = 5001
BALANCER_PORT = 5000


def request_rspec(topology: Topology, hardware: str = "vm", image: str = DEFAULT_IMAGE) -> str:
    """The request RSpec XML, built with geni-lib (never a string template)."""
    import geni.rspec.igext as igext
    import geni.rspec.pg as pg

    request = pg.Request()
    interfaces = {}
    for node in topology.nodes:
        # igext.XenVM: pg.XenVM is deprecated in geni-lib 0.9.9.4 and warns
        resource = igext.XenVM(node.name) if hardware == "vm" else pg.RawPC(node.name)
        resource.disk_image = image
        if node.role == "balancer":
            resource.routable_control_ip = True  # so the page can be reached from outside
        for endpoint in topology.endpoints(node.name):
            iface = resource.addInterface(endpoint.interface)
            iface.addAddress(pg.IPv4Address(endpoint.address, NETMASK))
            interfaces[(endpoint.node, endpoint.interface)] = iface
        request.addResource(resource)
    for link in topology.links:
        lan = pg.Link(link.name)
        lan.addInterface(interfaces[(link.a.node, link.a.interface)])
        lan.addInterface(interfaces[(link.b.node, link.b.interface)])
        request.addResource(lan)
    return request.toXMLString(pretty_print=True, ucode=True)


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


def systemd_unit(role: str, directory: str) -> str:
    """A unit that restarts the role on failure and at boot; options come from IMGCLASS_* variables."""
    command = "serve" if role == "server" else "balance"
    return f"""[Unit]
Description=imgclass {role}
After=network-online.target
Wants=network-online.target

[Service]
Type=simple
WorkingDirectory={directory}
# IMGCLASS_* settings (port, backends, model dir...) written by 'imgclass testbed deploy --systemd'
EnvironmentFile=-/etc/default/imgclass-{role}
ExecStart={directory}/.venv/bin/imgclass {command}
Restart=on-failure
RestartSec=2
KillSignal=SIGTERM
TimeoutStopSec=40

[Install]
WantedBy=multi-user.target
"""


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


def main(argv: Sequence[str]) -> int:
    if argv and argv[0] == "emulate":
        from . import emulate

        return emulate.main(argv[1:])
    if argv and argv[0] in ("deploy", "status", "stop"):
        from . import deploy

        return deploy.main(argv[0], argv[1:])
    parser = config.make_parser(
        "imgclass testbed",
        "Testbed tools: 'rspec' writes the request RSpec, 'hosts' makes cluster.json from a manifest, "
        "'emulate' runs the RSpec's topology in network namespaces on this machine.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    rspec = sub.add_parser("rspec", help="write the GENI v3 request RSpec")
    rspec.add_argument(
        "--servers", type=int, default=DEFAULT_SERVERS, help=f"model servers [default {DEFAULT_SERVERS}]"
    )
    rspec.add_argument("--hardware", choices=("vm", "rawpc"), default="vm", help="XenVM or raw PC [default vm]")
    rspec.add_argument("--image", default=DEFAULT_IMAGE, help="disk image URN [default Ubuntu 22.04]")
    rspec.add_argument("-o", "--output", help="file to write [default stdout]")
    unit = sub.add_parser("unit", help="print the systemd unit for a role (install_script.sh --systemd uses it)")
    unit.add_argument("--role", choices=("server", "balancer"), required=True)
    unit.add_argument("--dir", required=True, help="the project folder on the node")
    hosts = sub.add_parser("hosts", help="cluster.json from a manifest RSpec")
    hosts.add_argument("manifest", help="the manifest XML saved from the portal")
    hosts.add_argument("-o", "--output", default="cluster.json", help="[default cluster.json]")
    args = parser.parse_args(argv)
    if args.command == "unit":
        print(systemd_unit(args.role, args.dir), end="")
        return 0
    if args.command == "rspec":
        try:
            text = request_rspec(star(args.servers), args.hardware, args.image)
        except ValueError as exc:
            raise ConfigError(f"--servers {args.servers}: {exc}.") from exc
        if args.output:
            Path(args.output).write_text(text)
        else:
            print(text, end="")
    else:
        try:
            manifest = Path(args.manifest).read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read {args.manifest!r} ({exc.strerror}).") from exc
        doc = cluster_from_manifest(manifest)
        Path(args.output).write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {args.output}: " + ", ".join(f"{n['name']} ({n['role']})" for n in doc["nodes"]))
    return 0
