"""Pipit's kernel dataplane: Pipit's routes (kernel_routes), and encapsulation: IPIP (tunl0),
VXLAN (vxlan.pipit), MTU and natOutgoing.

A library for the agent, which runs inside its node's network namespace; it knows nothing of
etcd or BGP (the agent decides the routes, allocates tunnel addresses and reads and writes
node records). Pure parts:

    encap       pool -> encapsulation, next hops (Never / Always / CrossSubnet), which pools
                need devices and give tunnel addresses, IPAM handles, VTEP MACs
    mtu         tunnel and pod MTU arithmetic (+ uplink detection, publishing the pod MTU)
    nat         the nftables ruleset of table `ip pipit-nat` (+ applying it with nft -f)
    capability  the one-sentence message for a missing ipip / vxlan module (+ the probe)

Kernel edges: kernel_routes (batched netlink for routes, stdlib only), and, each taking a
pyroute2 IPRoute opened in the node's namespace: tunnel (tunl0),
vxlan (vxlan.pipit, neighbour and FDB entries), and dataplane, which drives both. Routes are
ipip.kernel_routes's: `encap.route_next_hop` is the `next_hop` of policy.kernel_routes().

The agent, at start-up:
    for sentence in capability.check(pools): log it (error) and show it in the node status

on every reconcile pass (pools, nodes or routes changed):
    kinds = encap.kinds_in_use(pools)
    tunnel address: encap.tunnel_pools(pools, labels, IPIP) gives the pools to allocate from
        (handle encap.tunnel_handle(IPIP, node), recorded on the node record); none: release
        it. The same for VXLAN, whose VTEP address and encap.vtep_mac(node) go on the record.
    desired = dataplane.Desired(local=node address/prefix, kinds, tunnel_address,
                                vtep_address, vtep_mac, vteps=other nodes' RemoteVTEPs,
                                mtu_override)
    prepared = dataplane.prepare(ipr, desired)            # devices up before routes use them
    routes = policy.kernel_routes(accepted, own, next_hop=encap.route_next_hop(
        pools, desired.local, prepared.devices, desired.vteps))  # then KernelRoutes as today
    dataplane.retire(ipr, desired)                         # devices no pool needs, after routes
    nat.apply(pools)                                       # only when pools changed
    mtu.publish(path, prepared.pod_mtu)                    # for the CNI configuration

A changed mode needs nothing more: the next hops change, and KernelRoutes replaces each route
in place (NLM_F_REPLACE), so traffic moves to or off the tunnel without a gap.
"""
