"""BGPFilter (Calico's resource): ordered accept/reject rules over the routes a node imports
from and exports to the peers of the BGPPeers that name it (`filters: [name, ...]`). Stored
at /pipit/resources/bgpfilters/<name>.

    apiVersion: pipit.dev/v1
    kind: BGPFilter
    metadata: {name: tor-in}
    spec:
      importV4:
        - action: Accept            # only a default route and the rack's own subnet
          matchOperator: Equal
          cidr: 0.0.0.0/0
        - action: Accept
          matchOperator: In
          cidr: 192.168.3.0/24
          prefixLength: {min: 24, max: 28}
        - action: Reject
      exportV4:
        - action: Reject            # this ToR never hears of the load-balancer range
          matchOperator: In
          cidr: 10.97.0.0/16

A rule matches when all it names hold: `cidr` with `matchOperator` (Equal, NotEqual, In:
equal to or inside, NotIn; `prefixLength` bounds In and NotIn, by default from the cidr's own
length to /32), `peerType` (iBGP: the peer is in this node's AS; eBGP), `source: RemotePeers`
(a route learned from another peer: on export, one a route reflector reflects),
`communities: {values: [one]}` (a standard community the route carries) and `asPathPrefix`
(its AS path begins with these). A peer's filters are read in the order it names them, their
rules in order; the first rule that matches decides, and a route no rule matches is decided
as without filters (Calico's order).

Where Pipit differs from Calico, on purpose: a filter can refuse more but never opens a hole.
An import Accept ends the filters, and Pipit's own import rules still apply (no loops, not the
node's own blocks, not inside a service range, pod addresses only from the node that owns
them or with allowPoolPrefixes); an export Accept ends them too, and a node still announces
only its own blocks, borrowed addresses and service ranges (a node is no transit router). On
export, a node's own routes carry no community yet when the rules read them (Calico adds the
configured communities after its filters too). An export Accept may carry `operations`:
`addCommunity` (a standard or large community) and `prependASPath` (the AS numbers go at the
front of the path in the order given; to an eBGP peer the node's own AS still comes first, as
eBGP adds it). Not supported, refused with a sentence: `interface` and `priority`, and the
`setPriority` operation (Pipit exports no interface routes and sets no route priorities),
operations on import, a large community to match, and IPv6 rules (Pipit is IPv4 only for
now).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Network

from bgp_agent.bgp_config import parse_as_number, parse_community
from ipam.errors import InvalidResource
from ipam.pool import network_holds
from ipam.resource import (SpecReader, check_name, make_document, read_document, shown,
                           with_metadata)

KIND = "BGPFilter"
IMPORT, EXPORT = "importV4", "exportV4"
_V6 = ("importV6", "exportV6")
_FIELDS = {IMPORT, EXPORT, *_V6}
_RULE_FIELDS = {"action", "cidr", "matchOperator", "prefixLength", "source", "peerType",
                "communities", "asPathPrefix", "interface", "priority", "operations"}
ACTIONS = ("Accept", "Reject")
OPERATORS = ("Equal", "NotEqual", "In", "NotIn")
PEER_TYPES = ("eBGP", "iBGP")
_UNSUPPORTED = {
    "interface": "interface is not supported: Pipit exports no interface routes (only its "
                 "blocks, borrowed addresses and service ranges).",
    "priority": "priority is not supported: Pipit sets no route priorities.",
}
MAX_OPERATIONS = 10  # Calico's limit
_A_CIDR = "a CIDR such as 10.0.0.0/16"


@dataclass(frozen=True)
class FilterRule:
    action: str  # Accept | Reject
    cidr: IPv4Network | None = None
    operator: str | None = None  # with cidr: Equal | NotEqual | In | NotIn
    # In / NotIn: the prefix lengths that count as inside (written prefixLength: min, max)
    min_length: int | None = None
    max_length: int | None = None
    remote_only: bool = False  # source: RemotePeers
    peer_type: str | None = None  # eBGP | iBGP
    community: tuple[int, int] | None = None
    as_path_prefix: tuple[int, ...] = ()
    # operations of an export Accept, in order: communities added, AS numbers prepended
    operations: tuple[tuple[str, tuple[int, ...]], ...] = ()

    def matches(self, prefix: IPv4Network, ibgp: bool, remote: bool,
                communities: Sequence[tuple[int, int]], as_path: Sequence[int]) -> bool:
        if self.peer_type is not None and (self.peer_type == "iBGP") != ibgp:
            return False
        if self.remote_only and not remote:
            return False
        if self.community is not None and self.community not in communities:
            return False
        if self.as_path_prefix and tuple(as_path[:len(self.as_path_prefix)]) != \
                self.as_path_prefix:
            return False
        if self.cidr is None:
            return True
        if self.operator in ("Equal", "NotEqual"):
            return (prefix == self.cidr) == (self.operator == "Equal")
        inside = (self.min_length <= prefix.prefixlen <= self.max_length
                  and network_holds(self.cidr, prefix))
        return inside == (self.operator == "In")


@dataclass(frozen=True)
class BGPFilter:
    name: str
    import_rules: tuple[FilterRule, ...] = ()
    export_rules: tuple[FilterRule, ...] = ()
    labels: Mapping[str, str] = field(default_factory=dict, hash=False)
    annotations: Mapping[str, str] = field(default_factory=dict, hash=False)

    def rules(self, direction: str) -> tuple[FilterRule, ...]:
        return self.import_rules if direction == IMPORT else self.export_rules


@dataclass(frozen=True)
class Verdict:
    """The rule that decided: its action, which filter and rule (1-based) it is, and the
    operations of an Accept."""
    action: str
    filter: str
    rule: int
    direction: str
    operations: tuple[tuple[str, tuple[int, ...]], ...] = ()

    def __str__(self) -> str:
        verb = "accepts" if self.action == "Accept" else "rejects"
        return f"BGPFilter {self.filter!r} {verb} it ({self.direction} rule {self.rule})"


def decide(filters: Iterable[BGPFilter], direction: str, prefix: IPv4Network, ibgp: bool,
           remote: bool, communities: Sequence[tuple[int, int]] = (),
           as_path: Sequence[int] = ()) -> Verdict | None:
    """The first rule of the filters, in order, that matches the route; None if none does
    (the route is then decided as without filters)."""
    for one in filters:
        for number, rule in enumerate(one.rules(direction), 1):
            if rule.matches(prefix, ibgp, remote, communities, as_path):
                return Verdict(rule.action, one.name, number, direction, rule.operations)
    return None


def import_rejection(filters: Sequence[BGPFilter], prefix: IPv4Network, ibgp: bool,
                     communities: Sequence[tuple[int, int]], as_path: Sequence[int]) -> str:
    """Why the filters reject a received route ("" if they do not: an Accept, or no rule)."""
    verdict = decide(filters, IMPORT, prefix, ibgp, True, communities, as_path)
    return str(verdict) if verdict is not None and verdict.action == "Reject" else ""


@dataclass(frozen=True)
class Export:
    """What the filters make of a route this node would send: held back, or sent with these
    communities added and AS numbers prepended (none: as it is)."""
    sent: bool
    communities: tuple[tuple[int, int], ...] = ()
    large_communities: tuple[tuple[int, int, int], ...] = ()
    prepend: tuple[int, ...] = ()

    @property
    def changes(self) -> bool:
        return bool(self.communities or self.large_communities or self.prepend)


AS_IT_IS, HELD_BACK = Export(True), Export(False)


def export(filters: Sequence[BGPFilter], prefix: IPv4Network, ibgp: bool, remote: bool,
           communities: Sequence[tuple[int, int]] = (), as_path: Sequence[int] = ()) -> Export:
    """A route this node would send, past the filters: held back if a rule rejects it; an
    Accept's operations in order (addCommunity; prependASPath, whose AS numbers end up first
    in the path in the order given, as Calico's)."""
    verdict = decide(filters, EXPORT, prefix, ibgp, remote, communities, as_path)
    if verdict is None:
        return AS_IT_IS
    if verdict.action != "Accept":
        return HELD_BACK
    if not verdict.operations:
        return AS_IT_IS
    standard, large, prepend = [], [], ()
    for operation, value in verdict.operations:
        if operation == "addCommunity":
            (standard if len(value) == 2 else large).append(value)
        else:
            prepend = value + prepend
    return Export(True, tuple(dict.fromkeys(standard)), tuple(dict.fromkeys(large)), prepend)



# -- the resource ---------------------------------------------------------------------------

def filter_from_spec(name: str, spec: Mapping) -> BGPFilter:
    """Build a filter from its resource spec; any problem is one InvalidResource sentence."""
    check_name(KIND, name)
    read = SpecReader(KIND, name, spec, _FIELDS)
    for v6 in _V6:
        if spec.get(v6):
            raise read.fail(f"{v6} has rules; Pipit is IPv4 only for now (use importV4 and "
                            "exportV4).")
    return BGPFilter(name, import_rules=_rules(read, IMPORT), export_rules=_rules(read, EXPORT))


def _rules(read: SpecReader, direction: str) -> tuple[FilterRule, ...]:
    entries = read.spec.get(direction)
    if entries is None:
        return ()
    if not isinstance(entries, list):
        raise read.fail(f"{direction} must be a list of rules, not {shown(entries)}.")
    return tuple(_rule(read, direction, f"{direction} rule {n}", entry)
                 for n, entry in enumerate(entries, 1))


def _rule(read: SpecReader, direction: str, where: str, entry: object) -> FilterRule:
    if not isinstance(entry, Mapping):
        raise read.fail(f"{where} must be a mapping such as {{action: Reject, matchOperator: "
                        f"In, cidr: 10.0.0.0/8}}, not {shown(entry)}.")
    unknown = sorted(set(entry) - _RULE_FIELDS)
    if unknown:
        raise read.fail(f"{where}: unknown field {unknown[0]!r} (known: "
                        f"{', '.join(sorted(_RULE_FIELDS))}).")
    for name, why in _UNSUPPORTED.items():
        if entry.get(name) not in (None, "", [], {}):
            raise read.fail(f"{where}: {why}")
    action = entry.get("action")
    if action not in ACTIONS:
        raise read.fail(f"{where}: action {shown(action)} must be Accept or Reject.")
    cidr_text, operator = entry.get("cidr") or None, entry.get("matchOperator") or None
    if (cidr_text is None) != (operator is None):
        raise read.fail(f"{where}: cidr and matchOperator go together (give both or neither).")
    cidr = low = high = None
    if cidr_text is not None:
        if not isinstance(cidr_text, str):
            raise read.fail(f"{where}: cidr {shown(cidr_text)} is not {_A_CIDR}.")
        cidr = read.ipv4_network(f"{where}: cidr", cidr_text, _A_CIDR)
        if operator not in OPERATORS:
            raise read.fail(f"{where}: matchOperator {shown(operator)} is not one of "
                            f"{', '.join(OPERATORS)}.")
        low, high = _prefix_length(read, where, entry.get("prefixLength"), cidr, operator)
    elif entry.get("prefixLength") is not None:
        raise read.fail(f"{where}: prefixLength needs a cidr (and matchOperator In or NotIn).")
    source = entry.get("source") or None
    if source not in (None, "RemotePeers"):
        raise read.fail(f"{where}: source {shown(source)} can only be RemotePeers.")
    peer_type = entry.get("peerType") or None
    if peer_type not in (None, *PEER_TYPES):
        raise read.fail(f"{where}: peerType {shown(peer_type)} must be eBGP or iBGP.")
    return FilterRule(action, cidr, operator, low, high, source is not None, peer_type,
                      _community(read, where, entry.get("communities")),
                      _as_path_prefix(read, where, entry.get("asPathPrefix")),
                      _operations(read, direction, where, entry.get("operations"), action))


def _operations(read: SpecReader, direction: str, where: str, value: object, action: str
                ) -> tuple[tuple[str, tuple[int, ...]], ...]:
    if value in (None, []):
        return ()
    if action != "Accept":
        raise read.fail(f"{where}: operations go with action Accept only.")
    if direction == IMPORT:
        raise read.fail(f"{where}: operations on import are not supported by Pipit yet (on "
                        "export: addCommunity, prependASPath).")
    if not isinstance(value, list) or len(value) > MAX_OPERATIONS:
        raise read.fail(f"{where}: operations must list 1-{MAX_OPERATIONS} operations such as "
                        f"{{prependASPath: {{prefix: [64512]}}}}, not {shown(value)}.")
    found = []
    for number, entry in enumerate(value, 1):
        here = f"{where} operation {number}"
        if not isinstance(entry, Mapping) or len(entry) != 1:
            raise read.fail(f"{here} must be exactly one of addCommunity, prependASPath, not "
                            f"{shown(entry)}.")
        [(name, body)] = entry.items()
        if name == "setPriority":
            raise read.fail(f"{here}: setPriority is not supported: Pipit sets no route "
                            "priorities.")
        if name == "addCommunity" and isinstance(body, Mapping) and set(body) == {"value"}:
            found.append((name, parse_community(body["value"], f"{read.where}: {here}")))
        elif name == "prependASPath" and isinstance(body, Mapping) and set(body) == {"prefix"} \
                and isinstance(body["prefix"], list) and 1 <= len(body["prefix"]) <= 10:
            found.append((name, tuple(parse_as_number(a, f"{read.where}: {here}",
                                                      "prependASPath entry")
                                      for a in body["prefix"])))
        else:
            raise read.fail(f"{here} must be {{addCommunity: {{value: '64512:7'}}}} or "
                            f"{{prependASPath: {{prefix: [64512]}}}} (1-10 AS numbers), not "
                            f"{shown(entry)}.")
    return tuple(found)


def _prefix_length(read: SpecReader, where: str, value: object, cidr: IPv4Network,
                   operator: str) -> tuple[int | None, int | None]:
    if operator in ("Equal", "NotEqual"):
        if value is not None:
            raise read.fail(f"{where}: prefixLength goes with matchOperator In or NotIn (Equal "
                            "compares the whole prefix).")
        return None, None
    if value is None:
        return cidr.prefixlen, 32
    if not isinstance(value, Mapping) or set(value) - {"min", "max"}:
        raise read.fail(f"{where}: prefixLength must be {{min: N, max: N}}, not {shown(value)}.")
    bounds = []
    for end, default in (("min", cidr.prefixlen), ("max", 32)):
        number = value.get(end)
        if number is None:
            bounds.append(default)
            continue
        if not isinstance(number, int) or isinstance(number, bool) or not 0 <= number <= 32:
            raise read.fail(f"{where}: prefixLength {end} {shown(number)} is not a length "
                            "0-32.")
        bounds.append(number)
    low, high = max(bounds[0], cidr.prefixlen), bounds[1]
    if high < cidr.prefixlen:
        raise read.fail(f"{where}: prefixLength max {high} is shorter than {cidr} itself: a "
                        f"route inside it is /{cidr.prefixlen} or longer, so the rule would "
                        "match nothing.")
    if low > high:
        raise read.fail(f"{where}: prefixLength min {low} is more than its max {high}.")
    return low, high


def _community(read: SpecReader, where: str, value: object) -> tuple[int, int] | None:
    if value is None:
        return None
    values = value.get("values") if isinstance(value, Mapping) and set(value) == {"values"} \
        else None
    if not isinstance(values, list) or len(values) != 1:
        raise read.fail(f"{where}: communities must be {{values: ['64512:100']}}, with exactly "
                        f"one community (as Calico), not {shown(value)}.")
    community = parse_community(values[0], f"{read.where}: {where}")
    if len(community) != 2:
        raise read.fail(f"{where}: community {values[0]} is a large community; Pipit matches "
                        "standard communities (AS:VALUE) only for now.")
    return community


def _as_path_prefix(read: SpecReader, where: str, value: object) -> tuple[int, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not value:
        raise read.fail(f"{where}: asPathPrefix must list AS numbers such as [65001], not "
                        f"{shown(value)}.")
    return tuple(parse_as_number(a, f"{read.where}: {where}", "asPathPrefix entry")
                 for a in value)


def _rule_to_spec(rule: FilterRule) -> dict:
    spec: dict = {"action": rule.action}
    if rule.cidr is not None:
        spec.update(cidr=str(rule.cidr), matchOperator=rule.operator)
        if rule.operator in ("In", "NotIn") and (rule.min_length, rule.max_length) != \
                (rule.cidr.prefixlen, 32):
            spec["prefixLength"] = {"min": rule.min_length, "max": rule.max_length}
    if rule.remote_only:
        spec["source"] = "RemotePeers"
    if rule.peer_type is not None:
        spec["peerType"] = rule.peer_type
    if rule.community is not None:
        spec["communities"] = {"values": [":".join(map(str, rule.community))]}
    if rule.as_path_prefix:
        spec["asPathPrefix"] = list(rule.as_path_prefix)
    if rule.operations:
        spec["operations"] = [
            {"addCommunity": {"value": ":".join(map(str, value))}} if name == "addCommunity"
            else {"prependASPath": {"prefix": list(value)}} for name, value in rule.operations]
    return spec


def filter_to_document(one: BGPFilter) -> dict:
    spec = {direction: [_rule_to_spec(r) for r in one.rules(direction)]
            for direction in (EXPORT, IMPORT) if one.rules(direction)}
    return make_document(KIND, one.name, spec, one.labels, one.annotations)


def filter_from_document(doc: Mapping) -> BGPFilter:
    document = read_document(doc)
    if document.kind != KIND:
        raise InvalidResource(f"{document.kind} {document.name!r} is not a {KIND}.")
    return with_metadata(filter_from_spec(document.name, dict(document.spec)), document)


def rule_counts(one: BGPFilter) -> str:
    """`2 import, 1 export` (for pipitctl's table)."""
    return f"{len(one.import_rules)} import, {len(one.export_rules)} export"

