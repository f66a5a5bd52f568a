"""pipit-exabgp: two changes to how ExaBGP 5.0 hands one API command to many neighbours, which
is what a reflector's batched commands are (`neighbor A , neighbor B , ... announce attributes
... nlri ...` to every client at once). Same results, far less work per neighbour:

1. Which peers a command names. ExaBGP matches every peer's name against every `neighbor X`
   of the command with a regular expression built for that pair: a command to 200 clients of
   a 200-client reflector is 40,000 searches (half of the reflector's ExaBGP time in
   bench.rr). A command whose selectors are all a plain `neighbor <address>` is now matched
   by address in one pass over the peers (same peers, same order); any other form (`local-as
   ...`, `neighbor *`) goes to ExaBGP's own matching.
2. One route given to many neighbours was deep-copied once per neighbour
   (`Neighbor.remove_self` copies before it looks whether the next hop is `self`), and every
   copy then worked out its own index and text. The copy is needed only to write that
   neighbour's own address into it. For a route whose next hop is not `self` (everything a
   reflector sends: it keeps the next hop), every neighbour's outgoing RIB now holds the same
   change: nothing changes a change once it is in a RIB (a withdrawal is made on a copy,
   `exabgp.rib.outgoing.OutgoingRIB.del_from_rib`), nor its attributes (packed per session,
   never cached by session).

`apply()` installs both, only into the releases they were written against (5.0.x, as
bgp_agent.exabgp_reactor).
"""

from __future__ import annotations

FIXED_RELEASES = ("5.0.",)


def plain_addresses(descriptions) -> set[str] | None:
    """The addresses of a command's neighbour selectors if each is a plain `neighbor
    <address>`, else None (ExaBGP's matching decides)."""
    wanted = set()
    for description in descriptions:
        if len(description) != 1:
            return None
        words = description[0].split()
        if len(words) != 2 or words[0] != "neighbor" or words[1] == "*":
            return None
        wanted.add(words[1])
    return wanted


def peer_address(name: str) -> str | None:
    """The peer address in an ExaBGP peer name (`neighbor <address> local-ip ...`)."""
    words = name.split(" ", 2)
    return words[1] if len(words) > 1 and words[0] == "neighbor" else None


def matcher(original):
    """ExaBGP's match_neighbors(peers, descriptions) with the by-address fast path."""
    def match_neighbors(peers, descriptions):
        wanted = plain_addresses(descriptions) if descriptions else None
        if wanted is None:
            return original(peers, descriptions)
        return [name for name in peers if peer_address(name) in wanted]
    match_neighbors.__wrapped__ = original
    return match_neighbors


def sharing(original):
    """ExaBGP's Neighbor.remove_self(change), which copies, called only when the change's next
    hop is `self`; any other change is given to the neighbour as it is."""
    def remove_self(neighbor, change):
        if not change.nlri.nexthop.SELF:
            return change
        return original(neighbor, change)
    remove_self.__wrapped__ = original
    return remove_self


def apply() -> str | None:
    """Install both into ExaBGP. None if done, else why not."""
    from exabgp.bgp.neighbor import Neighbor
    from exabgp.reactor.api.command import announce, limit, rib
    from exabgp.version import release
    if not release.startswith(FIXED_RELEASES):
        return f"ExaBGP {release} is not a release these changes were written for"
    original = getattr(limit.match_neighbors, "__wrapped__", limit.match_neighbors)
    fast = matcher(original)
    for module in (limit, announce, rib):  # each imported the function by name
        module.match_neighbors = fast
    Neighbor.remove_self = sharing(getattr(Neighbor.remove_self, "__wrapped__",
                                           Neighbor.remove_self))
    return None
