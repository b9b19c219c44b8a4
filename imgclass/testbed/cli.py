"""`imgclass testbed`: rspec, unit, hosts, and the emulate, deploy, status and stop subcommands."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from .. import config
from ..errors import ConfigError
from .inventory import cluster_from_manifest
from .rspec import DEFAULT_IMAGE, DEFAULT_SERVERS, request_rspec
from .topology import star
from .unit import COMMANDS, systemd_unit


def servers_arg(value: str) -> int:
    what = "give a whole number of servers between 1 and 250 (one 10.10.k.0/24 per link)"
    try:
        servers = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number; {what}") from None
    if not 1 <= servers <= 250:
        raise argparse.ArgumentTypeError(what)
    return servers


SUBCOMMANDS = {
    "rspec": "write the GENI v3 request RSpec (upload it to CloudLab)",
    "hosts": "make cluster.json from the manifest RSpec the portal gives back",
    "deploy": "copy the project to every node over SSH, install each role, start it",
    "status": "check every node's role",
    "stop": "stop every node's role",
    "emulate": "run the RSpec's topology on this machine, in network namespaces (root)",
    "unit": "print the systemd unit of a role (install_script.sh --systemd uses it)",
}


def main(argv: Sequence[str]) -> int:
    if argv and argv[0] == "emulate":
        from . import emulate

        return emulate.main(argv[1:])
    if argv and argv[0] in ("deploy", "status", "stop"):
        from . import deploy

        return deploy.main(argv[0], argv[1:])
    parser = config.make_parser(
        "imgclass testbed",
        "Testbed tools, in the order a testbed user needs them. Run 'imgclass testbed COMMAND --help' for one.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # emulate, deploy, status and stop have parsers of their own (dispatched above): here only for --help
    parsers = {name: sub.add_parser(name, help=summary) for name, summary in SUBCOMMANDS.items()}
    rspec = parsers["rspec"]
    rspec.add_argument(
        "--servers", type=servers_arg, default=DEFAULT_SERVERS,
        help=f"model servers, 1 to 250 [default {DEFAULT_SERVERS}]",
    )  # fmt: skip
    rspec.add_argument("--hardware", choices=("vm", "rawpc"), default="vm", help="XenVM or raw PC [default vm]")
    rspec.add_argument("--image", default=DEFAULT_IMAGE, help="disk image URN [default Ubuntu 22.04]")
    rspec.add_argument("-o", "--output", help="file to write [default stdout]")
    unit = parsers["unit"]
    unit.add_argument("--role", choices=tuple(COMMANDS), required=True)
    unit.add_argument("--dir", required=True, help="the project folder on the node")
    hosts = parsers["hosts"]
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
            print(f"wrote {args.output}: a request RSpec for {args.servers} server(s), a balancer and a client")
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
