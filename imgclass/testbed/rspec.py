"""A GENI v3 request RSpec for the topology, built with geni-lib (never a string template)."""

from __future__ import annotations

from .topology import NETMASK, Topology

DEFAULT_SERVERS = 4
# Ubuntu 22.04 on CloudLab/Emulab clusters; override with --image.
DEFAULT_IMAGE = "urn:publicid:IDN+emulab.net+image+emulab-ops//UBUNTU22-64-STD"


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
