"""Inside the VM: program each node of the plan with Pipit's real dataplane code, the way the
agent does from inside its node's network namespace. Python runs 50-100x slower under qemu's
emulation, so this imports only what programming the kernel needs (pyroute2, ipip,
ipip.kernel_routes); the host computed the plan (which encapsulation each block's pool
asks for) with the pure functions. Prints `RESULT key=value` lines.

usage: python program.py PLAN.json
"""

import ctypes
import json
import os
import sys
import time

started = time.monotonic()
from ipaddress import IPv4Address, IPv4Interface, IPv4Network  # noqa: E402

from pyroute2 import IPRoute  # noqa: E402

from ipip.kernel_routes import KernelRoutes  # noqa: E402
from ipip.route_table import RouteTable  # noqa: E402
from ipip.routes import Route  # noqa: E402
from ipip import capability, dataplane, encap, links  # noqa: E402

CLONE_NEWNET = 0x40000000


def enter(netns: str) -> None:
    """Move this (single-threaded) process into a named network namespace."""
    fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
    try:
        if ctypes.CDLL(None, use_errno=True).setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {netns}")
    finally:
        os.close(fd)


def program(node: dict) -> None:
    enter(node["netns"])
    local = IPv4Interface(node["address"])
    desired = dataplane.Desired(
        local=local, kinds=frozenset(node["kinds"]),
        tunnel_address=IPv4Address(node["tunnel_address"]) if node["tunnel_address"] else None)
    with IPRoute() as ipr:
        prepared = dataplane.prepare(ipr, desired)
    routes = {}
    for block in node["own_blocks"]:
        routes[IPv4Network(block)] = Route(IPv4Network(block), blackhole=True)
    for remote in node["remote"]:
        block = IPv4Network(remote["block"])
        how = encap.Encap(remote["kind"], remote["mode"])
        hop = encap.next_hop(how, local, IPv4Address(remote["gateway"]), prepared.devices)
        routes[block] = Route(block, (hop,))
    with KernelRoutes() as kernel:
        stats = RouteTable(kernel).sync(routes)
    with IPRoute() as ipr:
        dataplane.retire(ipr, desired)
    print(f"RESULT node={node['name']} pod_mtu={prepared.pod_mtu} tunl0={prepared.devices.tunl0}"
          f" added={stats.added} errors={len(prepared.errors) + len(stats.errors)}", flush=True)
    for error in (*prepared.errors, *stats.errors):
        print(f"RESULT error={node['name']}: {error}", flush=True)


def tunnel_lifecycle(netns: str) -> None:
    """tunl0 as pools change, in a namespace of its own: its address is replaced, released
    (IPIP pools remain, none selects the node: tunl0 stays up), and with no IPIP pool left
    tunl0 goes down without an address."""
    enter(netns)
    local = IPv4Interface("192.168.9.10/24")
    steps = [("first", "10.9.0.1"), ("moved", "10.9.0.2"), ("released", None), ("retired", None)]
    with IPRoute() as ipr:
        ipr.link("add", ifname="eth0", kind="veth", peer="eth1")
        ipr.addr("add", index=ipr.link_lookup(ifname="eth0")[0], address="192.168.9.10",
                 prefixlen=24)
        for step, address in steps:
            desired = dataplane.Desired(
                local=local, kinds=frozenset() if step == "retired" else frozenset({encap.IPIP}),
                tunnel_address=IPv4Address(address) if address else None)
            dataplane.prepare(ipr, desired)
            dataplane.retire(ipr, desired)
            index = links.lookup(ipr, encap.TUNL0)
            up = bool(links.link(ipr, index)["flags"] & links.IFF_UP)
            have = ",".join(sorted(str(a) for a in links.addresses(ipr, index))) or "none"
            print(f"RESULT lifecycle_{step}=up={up} addresses={have}", flush=True)


def main() -> None:
    print(f"RESULT import_seconds={time.monotonic() - started:.1f}", flush=True)
    print(f"RESULT kernel_supports_ipip={capability.kernel_supports(encap.IPIP)}", flush=True)
    with open(sys.argv[1]) as file:
        plan = json.load(file)
    for node in plan["nodes"]:
        program(node)
    tunnel_lifecycle(plan["lifecycle_netns"])
    print(f"RESULT program_seconds={time.monotonic() - started:.1f}", flush=True)


if __name__ == "__main__":
    main()
