"""Pipit's routes as data (ipip.routes: canonical next hops, the diff) and as netlink messages
(ipip.route_netlink), without a kernel. test_kernel_routes sends them to a real one."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ipip.route_netlink import (
    NLM_F_CREATE,
    NLM_F_REPLACE,
    RT_SCOPE_NOWHERE,
    RTM_DELROUTE,
    decode_route,
    encode_delroute,
    encode_newroute,
)
from ipip.routes import RTPROT_PIPIT, NextHop, Route, diff
from tests.route_support import GW1, GW2, N, blackhole, by_dst, via

# --------------------------------------------------------------------------------------------
# Pure: route data and diff

def test_nexthops_are_kept_in_canonical_order():
    one = Route(N("10.1.0.0/26"), (NextHop(GW2), NextHop(GW1)))
    other = Route(N("10.1.0.0/26"), [NextHop(GW1), NextHop(GW2)])
    assert one == other and hash(one) == hash(other)
    assert one.nexthops == (NextHop(GW1), NextHop(GW2))


@pytest.mark.parametrize("make", [
    lambda: Route(N("10.1.0.0/26")),
    lambda: Route(N("10.1.0.0/26"), (NextHop(GW1),), blackhole=True),
    lambda: NextHop(GW1, onlink=True),
])
def test_invalid_routes_are_refused(make):
    with pytest.raises(ValueError):
        make()


def test_diff_replaces_missing_and_changed_and_deletes_stale():
    keep, change, gone = via("10.1.0.0/26", GW1), via("10.1.1.0/26", GW1), via("10.1.2.0/26", GW1)
    new = blackhole("10.1.3.0/26")
    changed = via("10.1.1.0/26", GW1, GW2)
    to_replace, to_delete = diff(by_dst(keep, changed, new), by_dst(keep, change, gone))
    assert to_replace == [changed, new]
    assert to_delete == [gone]


def test_diff_of_equal_tables_is_empty():
    routes = by_dst(via("10.1.0.0/26", GW1), blackhole("10.1.1.0/26"), via("10.1.2.0/26", GW2, GW1))
    assert diff(routes, dict(routes)) == ([], [])
    assert diff({}, {}) == ([], [])


def test_diff_wanted_nexthop_without_device_matches_any_device():
    # The kernel reports the device it picked; a desired route without one still matches.
    kernel = via("10.1.0.0/26", GW1, ifindex=7)
    assert diff(by_dst(via("10.1.0.0/26", GW1)), by_dst(kernel)) == ([], [])
    wrong_device = via("10.1.0.0/26", GW1, ifindex=8)
    assert diff(by_dst(wrong_device), by_dst(kernel)) == ([wrong_device], [])
    onlink = via("10.1.0.0/26", GW1, ifindex=7, onlink=True)
    assert diff(by_dst(onlink), by_dst(kernel)) == ([onlink], [])


def test_diff_blackhole_versus_via_is_a_change():
    assert diff(by_dst(blackhole("10.1.0.0/26")), by_dst(via("10.1.0.0/26", GW1))) == (
        [blackhole("10.1.0.0/26")], [])


# --------------------------------------------------------------------------------------------
# Pure: netlink encoding

gateways = st.integers(1, 2**32 - 2).map(IPv4Address)
nexthops = st.builds(
    lambda gw, ifindex, onlink: NextHop(gw, ifindex, onlink and ifindex is not None),
    gateways, st.none() | st.integers(1, 2**31 - 1), st.booleans())
networks = st.builds(lambda addr, plen: IPv4Network((addr, plen), strict=False),
                     st.integers(0, 2**32 - 1), st.integers(0, 32))
routes = st.one_of(
    st.builds(Route, networks, st.lists(nexthops, min_size=1, max_size=4).map(tuple),
              st.just(False), st.sampled_from([254, 100, 1000, 2**31])),
    st.builds(Route, networks, st.just(()), st.just(True), st.sampled_from([254, 1000])),
)


@given(routes)
def test_encoded_route_decodes_to_itself(route):
    message = encode_newroute(route, NLM_F_CREATE | NLM_F_REPLACE, 1)
    assert len(message) % 4 == 0
    assert decode_route(message, 0, len(message), route.table) == route


def test_delete_request_matches_only_pipit_routes_of_any_scope():
    message = encode_delroute(via("10.1.0.0/26", GW1), 0, 9)
    assert int.from_bytes(message[4:6], "little") == RTM_DELROUTE
    family, dst_len, _, _, table, protocol, scope, rtm_type = message[16:24]
    assert (dst_len, table, protocol, scope, rtm_type) == (
        26, 254, RTPROT_PIPIT, RT_SCOPE_NOWHERE, 0)
