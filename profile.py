"""CloudLab profile for imgclass: a balancer, N model servers and a client, as in image_class.rspec.

CloudLab runs this file itself with its own geni-lib, so it cannot import the imgclass package; it
builds the same topology as `imgclass testbed rspec` (a test checks that the two agree).
"""

import geni.portal as portal
import geni.rspec.igext as igext
import geni.rspec.pg as pg

context = portal.Context()
context.defineParameter("servers", "Number of model servers", portal.ParameterType.INTEGER, 4)
context.defineParameter(
    "hardware", "Node type", portal.ParameterType.STRING, "vm", [("vm", "Xen VM"), ("rawpc", "Raw PC")]
)
context.defineParameter(
    "image", "Disk image", portal.ParameterType.IMAGE, "urn:publicid:IDN+emulab.net+image+emulab-ops//UBUNTU22-64-STD"
)
params = context.bindParameters()
if not 1 <= params.servers <= 250:
    context.reportError(portal.ParameterError("Choose between 1 and 250 servers.", ["servers"]))
context.verifyParameters()

request = context.makeRequestRSpec()


def make_node(name):
    node = igext.XenVM(name) if params.hardware == "vm" else pg.RawPC(name)
    node.disk_image = params.image
    request.addResource(node)
    return node


def add_interface(node, name, address):
    iface = node.addInterface(name)
    iface.addAddress(pg.IPv4Address(address, "255.255.255.0"))
    return iface


balancer = make_node("balancer")
balancer.routable_control_ip = True
servers = [make_node("server%d" % k) for k in range(1, params.servers + 1)]
client = make_node("client")
# nodes first, then links, each in the order imgclass.testbed uses
links = []
for k, server in enumerate(servers, start=1):
    link = pg.Link("link%d" % k)
    link.addInterface(add_interface(server, "if1", "10.10.%d.1" % k))
    link.addInterface(add_interface(balancer, "if%d" % k, "10.10.%d.2" % k))
    links.append(link)
c = params.servers + 1
link = pg.Link("link%d" % c)
link.addInterface(add_interface(client, "if1", "10.10.%d.1" % c))
link.addInterface(add_interface(balancer, "if%d" % c, "10.10.%d.2" % c))
links.append(link)
for link in links:
    request.addResource(link)

context.printRequestRSpec()
