"""Pipit's route reflector (RFC 4456), the pure part: peers with a role, an Adj-RIB-In per
peer, the best path per prefix, the reflection rules, and what to send to whom. No I/O, no
clock, no asyncio; nothing here knows of etcd, the kernel, ExaBGP or bgp_agent.

Driving it (the agent owns the sessions; ExaBGP carries the messages):

    rr = Reflector(router_id, cluster_id)           # always_compare_med=False
    out = rr.add_peer(address, CLIENT)              # or NON_CLIENT; again with another role
    out = rr.peer_up(address)                       # Established: it gets the whole table
    out = rr.update(address, announce=[Route(...)], withdraw=[prefix])   # an UPDATE
    out = rr.end_of_rib(address)                    # its stale routes not re-sent go
    out = rr.peer_down(address, now=t, graceful_restart=..., notification=..., restart_time=...)
    out = rr.expire(now)                            # at rr.next_deadline(): stale routes go
    out = rr.remove_peer(address)

Every call that changes something returns a list of `Update(peers, prefix, attributes)`:
`prefix` is to be announced with `attributes` to every one of `peers`, or withdrawn when
`attributes` is None. Only changes are returned (a re-announced identical route gives
nothing, a withdrawal goes only to peers that had the route), except after `peer_up`, whose
updates are that peer's whole table. One update carries a whole fan-out: a best route is
computed, and its reflected attributes built, once per prefix, and its set of peers is shared
by every prefix from the same source. Updates are applied in order; several calls' lists can
be concatenated and sent together:

    for b in batch(out):        # Batch(peers, attributes, prefixes): later updates win
        # neighbor A , neighbor B announce attributes <b.attributes> nlri <b.prefixes>
        # or, attributes None: neighbor A , neighbor B withdraw attributes nlri <b.prefixes>

`per_peer(out)` gives the same net effect peer by peer. A peer is never sent anything while
it is down; when it goes down, what it had been sent is forgotten (ExaBGP drops its
Adj-RIB-Out with the session) and `peer_up` sends it all again.

Conversions are field copies: `Route` takes bgp_agent.model.Path's fields in Path's order,
plus `peer` (the session's address) and `peer_router_id` (PeerState.router_id, from the
peer's OPEN); `Attributes` has Announcement's names plus `origin`, which must be sent too
(reflection changes no attribute but ORIGINATOR_ID and CLUSTER_LIST). `peer_down` takes
PeerState's graceful_restart, notification and restart_time.

The rules (RFC 4456, with choices where the RFCs leave one):

- Every peer is internal (same AS): a client, or a non-client (in Pipit, another reflector
  of the same cluster id). A client's best route goes to every other up peer, a
  non-client's to clients only, never back to the peer it came from; a peer gets nothing for
  a prefix whose best route may not go to it (no second-best).
- Best path (best_path.py): LOCAL_PREF (absent: 100), AS_PATH length, ORIGIN, MED (absent:
  0) between routes from the same neighbouring AS only unless always_compare_med,
  ORIGINATOR_ID or else the peer's router id, CLUSTER_LIST length, peer address. Stale
  routes are not depreferred.
- Sent attributes: as received, next hop included; ORIGINATOR_ID set to the source peer's
  router id if absent; our cluster id prepended to CLUSTER_LIST.
- A route whose CLUSTER_LIST holds our cluster id, or whose ORIGINATOR_ID is our router id,
  is ignored (and replaces, so withdraws, that peer's earlier route for its prefix).
  `peers()[a].looped` counts them for status.
- A session that ends drops the peer's routes (ExaBGP sends no withdrawals), unless it had
  negotiated graceful restart, did not end with a NOTIFICATION and restart_time > 0: then
  they stay, stale, until it re-sends them, sends End-of-RIB (those not re-sent go) or
  `now + restart_time` passes (`expire(now)`; the deadline keeps running after the session
  is back, until End-of-RIB). A NOTIFICATION reported later drops them at once.

Left to the caller: import policy (what may be reflected at all), End-of-RIB to peers
(`waiting_for_end_of_rib()` tells which up peers have not finished sending theirs; after a
reflector restart, sending End-of-RIB to graceful-restart clients before that is empty makes
them flush routes the reflector has not relearnt yet), routes the reflector node originates
itself (the agent announces those), and the speaker's own restart (`full_table(peer)`).
`set_table(peer, routes)` suits a pass-based caller that sees whole received tables.
"""

from route_reflector.batching import MAX_PREFIXES, Batch, batch, per_peer
from route_reflector.best_path import DEFAULT_LOCAL_PREF, best_path
from route_reflector.reflection import CLIENT, NON_CLIENT, ROLES, looped, reflected, reflects
from route_reflector.reflector import Peer, Reflector
from route_reflector.route import ORIGINS, Attributes, Route, Update

__all__ = [
    "CLIENT", "DEFAULT_LOCAL_PREF", "MAX_PREFIXES", "NON_CLIENT", "ORIGINS", "ROLES",
    "Attributes", "Batch", "Peer", "Reflector", "Route", "Update",
    "batch", "best_path", "looped", "per_peer", "reflected", "reflects",
]
