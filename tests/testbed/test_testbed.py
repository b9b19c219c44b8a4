"""Testbed tools: the RSpec (geni-lib), the CloudLab profile, and cluster.json from a manifest."""

from __future__ import annotations

import json
import runpy
import shutil
import subprocess
import sys
import types
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from imgclass.errors import ConfigError
from imgclass.testbed import inventory
from imgclass.testbed.rspec import DEFAULT_SERVERS, request_rspec
from imgclass.testbed.topology import star
from imgclass.testbed.unit import systemd_unit

ROOT = Path(__file__).resolve().parents[2]
NS = {"r": "http://www.geni.net/resources/rspec/3"}


def test_committed_rspec_is_the_generators_default() -> None:
    assert (ROOT / "image_class.rspec").read_text() == request_rspec(star(DEFAULT_SERVERS))


def test_rspec_for_six_servers_has_the_original_addresses() -> None:
    proc = subprocess.run([sys.executable, "-W", "error", "-m", "imgclass", "testbed", "rspec", "--servers", "6"],
                          capture_output=True, text=True, timeout=60, check=True)  # fmt: skip
    root = ET.fromstring(proc.stdout)
    assert root.get("type") == "request"
    nodes = {n.get("client_id"): n for n in root.findall("r:node", NS)}
    assert set(nodes) == {"balancer", "client", *(f"server{k}" for k in range(1, 7))}
    links = root.findall("r:link", NS)
    assert len(links) == 7
    for k in range(1, 7):
        ip = nodes[f"server{k}"].find("r:interface/r:ip", NS)
        assert ip is not None and ip.get("address") == f"10.10.{k}.1" and ip.get("netmask") == "255.255.255.0"
        refs = [r.get("client_id") for r in links[k - 1].findall("r:interface_ref", NS)]
        assert refs == [f"server{k}:if1", f"balancer:if{k}"]
    balancer_ips = sorted(i.get("address") for i in nodes["balancer"].findall("r:interface/r:ip", NS))
    assert balancer_ips == sorted(f"10.10.{k}.2" for k in range(1, 8))
    assert nodes["client"].find("r:interface/r:ip", NS).get("address") == "10.10.7.1"
    assert "routable_control_ip" in ET.tostring(nodes["balancer"]).decode()
    assert "routable_control_ip" not in ET.tostring(nodes["server1"]).decode()


def test_rawpc_hardware() -> None:
    text = request_rspec(star(2), hardware="rawpc")
    assert 'sliver_type name="raw"' in text and 'exclusive="true"' in text and "emulab-xen" not in text


def test_bad_server_count_is_a_clear_error() -> None:
    proc = subprocess.run([sys.executable, "-m", "imgclass", "testbed", "rspec", "--servers", "0"],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 2 and "between 1 and 250" in proc.stderr and "Traceback" not in proc.stderr


def _portal_standin(servers: int, printed: list[str]) -> types.ModuleType:
    """PyPI's geni-lib 0.9.9.4 ships a Python-2-only geni.portal; CloudLab supplies its own. This
    stands in for the few portal calls the profile makes; the RSpec classes are geni-lib's own."""
    import geni.rspec.pg as pg

    portal = types.ModuleType("geni.portal")

    class Context:
        def __init__(self) -> None:
            self.defaults: dict[str, object] = {}
            self.request: pg.Request | None = None

        def defineParameter(self, name, description, kind, default, legal=None):
            self.defaults[name] = default

        def bindParameters(self):
            return types.SimpleNamespace(**{**self.defaults, "servers": servers})

        def reportError(self, error):
            raise AssertionError(error)

        def verifyParameters(self):
            return None

        def makeRequestRSpec(self):
            self.request = pg.Request()
            return self.request

        def printRequestRSpec(self):
            assert self.request is not None
            printed.append(self.request.toXMLString(pretty_print=True, ucode=True))

    portal.Context = Context
    portal.ParameterType = types.SimpleNamespace(INTEGER="integer", STRING="string", IMAGE="image")
    portal.ParameterError = lambda message, params: ValueError(message)
    return portal


@pytest.mark.parametrize("servers", [4, 6])
def test_profile_builds_the_same_topology(monkeypatch: pytest.MonkeyPatch, servers: int) -> None:
    import geni

    printed: list[str] = []
    standin = _portal_standin(servers, printed)
    monkeypatch.setitem(sys.modules, "geni.portal", standin)
    monkeypatch.setattr(geni, "portal", standin, raising=False)
    runpy.run_path(str(ROOT / "profile.py"), run_name="__main__")
    assert printed == [request_rspec(star(servers))]


MANIFEST = """<?xml version="1.0"?>
<rspec xmlns="http://www.geni.net/resources/rspec/3" type="manifest">
  <node client_id="balancer" component_id="urn:publicid:IDN+utah.cloudlab.us+node+pc1">
    <interface client_id="balancer:if1"><ip address="10.10.1.2" netmask="255.255.255.0" type="ipv4"/></interface>
    <interface client_id="balancer:if2"><ip address="10.10.2.2" netmask="255.255.255.0" type="ipv4"/></interface>
    <interface client_id="balancer:if3"><ip address="10.10.3.2" netmask="255.255.255.0" type="ipv4"/></interface>
    <services><login authentication="ssh-keys" hostname="pc1.utah.cloudlab.us" port="22" username="alice"/></services>
    <host name="balancer.exp.proj.utah.cloudlab.us" ipv4="155.98.36.1"/>
  </node>
  <node client_id="server1"><interface client_id="server1:if1"><ip address="10.10.1.1" netmask="255.255.255.0"/></interface>
    <services><login authentication="ssh-keys" hostname="pc2.utah.cloudlab.us" port="22" username="alice"/></services></node>
  <node client_id="server2"><interface client_id="server2:if1"><ip address="10.10.2.1" netmask="255.255.255.0"/></interface>
    <services><login authentication="ssh-keys" hostname="pc3.utah.cloudlab.us" port="25010" username="alice"/></services></node>
  <node client_id="client"><interface client_id="client:if1"><ip address="10.10.3.1" netmask="255.255.255.0"/></interface>
    <services><login authentication="ssh-keys" hostname="pc4.utah.cloudlab.us" port="22" username="alice"/></services></node>
  <link client_id="link1"/>
</rspec>
"""


def test_hosts_from_manifest_and_balancer_cluster_option(tmp_path: Path) -> None:
    manifest = tmp_path / "manifest.xml"
    manifest.write_text(MANIFEST)
    out = tmp_path / "cluster.json"
    proc = subprocess.run([sys.executable, "-m", "imgclass", "testbed", "hosts", str(manifest), "-o", str(out)],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    nodes = {n["name"]: n for n in json.loads(out.read_text())["nodes"]}
    assert nodes["balancer"]["role"] == "balancer" and nodes["balancer"]["control_host"] == "pc1.utah.cloudlab.us"
    assert nodes["balancer"]["data_ips"] == ["10.10.1.2", "10.10.2.2", "10.10.3.2"]
    assert nodes["server2"] == {
        "role": "server", "name": "server2", "control_host": "pc3.utah.cloudlab.us", "control_port": 25010,
        "user": "alice", "data_ips": ["10.10.2.1"], "data_ip": "10.10.2.1", "service_port": 5001,
    }  # fmt: skip
    assert nodes["client"]["role"] == "client"
    assert inventory.backends_from_cluster(str(out)) == ["http://10.10.1.1:5001", "http://10.10.2.1:5001"]
    # load_balancer.py --cluster reads the same file (here it only parses: no node is reachable)
    from imgclass import config
    from imgclass.balancing import settings as balancer

    parser = config.make_parser("t", "t")
    balancer.add_arguments(parser)
    settings = balancer.BalancerSettings.from_namespace(parser.parse_args(["--cluster", str(out)]))
    assert settings.backends == ["http://10.10.1.1:5001", "http://10.10.2.1:5001"]


def test_bad_manifest_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="not valid XML"):
        inventory.cluster_from_manifest("<rspec")
    with pytest.raises(ConfigError, match="balancer"):
        inventory.cluster_from_manifest('<rspec xmlns="http://www.geni.net/resources/rspec/3"/>')


@pytest.mark.parametrize(("role", "command"), [("server", "serve"), ("balancer", "balance")])
def test_systemd_unit(role: str, command: str, tmp_path: Path) -> None:
    text = systemd_unit(role, "/opt/imgclass")
    assert f"ExecStart=/opt/imgclass/.venv/bin/imgclass {command}\n" in text
    assert "Restart=on-failure" in text and "WantedBy=multi-user.target" in text
    assert f"EnvironmentFile=-/etc/default/imgclass-{role}" in text
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        return  # the content checks above still ran; a full verify needs systemd
    unit = tmp_path / f"imgclass-{role}.service"
    unit.write_text(text.replace("/opt/imgclass/.venv/bin/imgclass", "/bin/true"))
    proc = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert "error" not in proc.stderr.lower(), proc.stderr
