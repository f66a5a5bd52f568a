"""Pipit's kernel dataplane: everything the agent does to its node's kernel, and nothing else
(no etcd, no BGP; bgp_agent decides, allocates tunnel addresses and keeps node records).

Routes (standard library only):
    routes          a route and its next hops as data, RTPROT_PIPIT, the diff
    route_netlink   routes as netlink messages, and the kernel's answers decoded
    kernel_routes   KernelRoutes: the netlink socket of one namespace, dump and batched apply
    route_table     RouteTable: what the kernel holds of Pipit's, kept equal to what is wanted
                    (the agent's one call, sync(); measured by bench.routes)

Encapsulation, MTU and NAT (pure parts, then their kernel edges, which take a pyroute2 IPRoute
opened in the node's namespace):
    encap       pool -> encapsulation (Never / Always / CrossSubnet), next hops, which pools
                need devices and give tunnel addresses, IPAM handles, VTEP MACs
    mtu         tunnel and pod MTU arithmetic (+ uplink detection, publishing the pod MTU)
    nat         the nftables ruleset of table `ip pipit-nat` (+ applying it with nft -f)
    capability  the one-sentence message for a missing ipip / vxlan module (+ the probe)
    links, tunnel, vxlan   tunl0, vxlan.pipit with its neighbour and FDB entries
    dataplane   drives the devices: prepare() before routes use them, retire() after

The folder keeps its first name, `ipip`, though it holds the whole dataplane. How the agent
calls it, in order, is bgp_agent.node_dataplane's and bgp_agent.routing's to say.
"""
