"""IP reservations (Calico's IPReservation): addresses IPAM never hands out on its own. The
resource's rules and the block arithmetic by table; the real allocator against a real etcd;
pipitctl as users run it."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

import pytest
import yaml

from ipam import block as blocks
from ipam import keys
from ipam.allocator import IPAM
from ipam.errors import InvalidResource, PoolExhausted
from ipam.reservation import (IPReservation, Reserved, reservation_from_spec,
                              reservation_to_document, reserved_by)
from tests.helpers import add_pool, with_store
from tests.pipitctl_support import assign, ok, snapshot
from tests.sentences import one_sentence

A, N = IPv4Address, IPv4Network


# --------------------------------------------------------------------------------------------
# The resource and the arithmetic (pure)

def test_a_reservation_takes_addresses_and_cidrs_and_writes_addresses_back_as_given():
    reservation = reservation_from_spec("infra", {"reservedCIDRs": [
        "10.244.0.7", "10.244.1.0/28", "10.244.0.7/32", " 10.244.2.0/24 "]})
    assert reservation.cidrs == (N("10.244.0.7/32"), N("10.244.1.0/28"), N("10.244.2.0/24"))
    assert reservation_to_document(reservation)["spec"] == {
        "reservedCIDRs": ["10.244.0.7", "10.244.1.0/28", "10.244.2.0/24"]}


@pytest.mark.parametrize("spec, facts", [
    ({}, ["'infra'", "reservedCIDRs must list at least one"]),
    ({"reservedCIDRs": []}, ["reservedCIDRs must list at least one"]),
    ({"reservedCIDRs": "10.244.0.7"}, ["reservedCIDRs must list"]),
    ({"reservedCIDRs": ["10.244.0.1/24"]}, ["host bits", "10.244.0.0/24"]),
    ({"reservedCIDRs": ["fd00::1"]}, ["fd00::1", "IPv6"]),
    ({"reservedCIDRs": ["ten.0.0.1"]}, ["'ten.0.0.1'", "not an address or a CIDR"]),
    ({"reservedCIDRs": [7]}, ["7", "not an address or a CIDR"]),
    ({"reservedCIDRs": ["10.244.0.7"], "cidrs": []}, ["unknown spec field 'cidrs'"]),
])
def test_a_bad_reservation_is_one_sentence(spec, facts):
    with pytest.raises(InvalidResource) as error:
        reservation_from_spec("infra", spec)
    assert all(fact in str(error.value) for fact in facts), str(error.value)


def test_reserved_ordinals_and_whole_blocks():
    reserved = reserved_by([IPReservation("a", (N("10.244.0.1/32"), N("10.244.0.4/30"))),
                            IPReservation("b", (N("10.244.0.8/29"),))])
    assert reserved.ordinals(N("10.244.0.0/29")) == {1, 4, 5, 6, 7}
    assert reserved.holds(A("10.244.0.9")) and not reserved.holds(A("10.244.0.2"))
    assert reserved.covers(N("10.244.0.8/29"))
    # the gateway (.0) and broadcast address (.7) are never handed out: .1-.6 is all of it
    usable = (N("10.244.0.1/32"), N("10.244.0.2/31"), N("10.244.0.4/31"), N("10.244.0.6/32"))
    assert reserved_by([IPReservation("c", usable)]).covers(N("10.244.0.0/29"))
    assert not reserved_by([IPReservation("c", usable[:-1])]).covers(N("10.244.0.0/29"))
    assert not reserved.covers(N("10.244.0.0/29"))
    assert not Reserved().covers(N("10.244.0.0/29")) and not Reserved()


def test_assign_skips_reserved_ordinals_which_keep_their_place_in_the_queue():
    block = blocks.new_block(N("10.244.0.0/29"), "n1")
    updated, got = blocks.assign(block, 2, "h1", skip=frozenset({1, 3}))
    assert got == [A("10.244.0.2"), A("10.244.0.4")]
    assert updated.unallocated == (1, 3, 5, 6)  # free again once nothing reserves them
    assert blocks.assign(block, 1, "h1", skip=frozenset(range(8)))[1] == []


# --------------------------------------------------------------------------------------------
# The real allocator, against a real etcd

def _reserve(config, name: str, *cidrs: str) -> None:
    async def write(store):
        await store.put(keys.resource_key("ipreservations", name), reservation_to_document(
            reservation_from_spec(name, {"reservedCIDRs": list(cidrs)})))
    with_store(config, write)


@pytest.fixture
def two_blocks(etcd):
    """Pool 10.244.0.0/28 in blocks of /29: two blocks of six addresses (.1-.6, .9-.14)."""
    with_store(etcd, lambda store: add_pool(store, "small", "10.244.0.0/28", blockSize=29))
    return etcd


def test_automatic_assignments_pass_over_reserved_addresses_and_wholly_reserved_blocks(
        two_blocks):
    _reserve(two_blocks, "first-block", "10.244.0.0/29")  # never claimed
    _reserve(two_blocks, "router", "10.244.0.9", "10.244.0.12/31")
    [got] = assign(two_blocks, ("n1", "pods", 3, {}))
    assert got == [A("10.244.0.10"), A("10.244.0.11"), A("10.244.0.14")]

    async def claimed(store):
        return [keys.block_cidr(key) for key in await store.list_keys(keys.BLOCKS)]
    assert with_store(two_blocks, claimed) == [N("10.244.0.8/29")]
    with pytest.raises(PoolExhausted):  # what is left is reserved
        assign(two_blocks, ("n1", "more", 1, {}))


def test_a_reservation_made_while_an_allocator_runs_holds_for_its_next_assignment(two_blocks):
    """The allocator caches what it read (10 s), but a batch that assigns on its own commits
    only if no reservation was written since it read them: the next pod does not get an
    address reserved a moment ago."""
    _reserve(two_blocks, "first-block", "10.244.0.0/29")

    async def scenario(store):
        ipam = IPAM(store)
        first = await ipam.assign("n1", "one")
        await store.put(keys.resource_key("ipreservations", "late"), reservation_to_document(
            reservation_from_spec("late", {"reservedCIDRs": ["10.244.0.10/31"]})))
        second = await ipam.assign("n1", "two")
        return first, second, ipam.transactions
    first, second, transactions = with_store(two_blocks, scenario)
    assert (first, second) == ([A("10.244.0.9")], [A("10.244.0.12")])
    assert transactions == 2


def test_a_requested_address_is_given_reserved_or_not_and_held_ones_are_kept(two_blocks):
    """Calico's rules: a pod asking for an address gets it; a reservation made after an
    address was handed out releases nothing."""
    [held] = assign(two_blocks, ("n1", "early", 1, {}))
    _reserve(two_blocks, "everything", "10.244.0.0/28")
    [asked] = assign(two_blocks, ("n1", "pinned", 1, {}, (), False, [held[0] + 1]))
    assert asked == [held[0] + 1]

    async def holders(store):
        return await IPAM(store).addresses("early")
    assert with_store(two_blocks, holders) == held
    with pytest.raises(PoolExhausted):
        assign(two_blocks, ("n1", "auto", 1, {}))


# --------------------------------------------------------------------------------------------
# pipitctl

RESERVATION = """apiVersion: pipit.dev/v1
kind: IPReservation
metadata: {name: infra}
spec:
  reservedCIDRs: [10.244.0.1, 10.244.8.0/29]
"""


def test_pipitctl_applies_lists_shows_and_deletes_a_reservation(etcd, ctl):
    assert ok(ctl("apply", "-f", "-", input=RESERVATION)).strip() != ""
    table = ok(ctl("get", "ipreservations")).splitlines()
    assert table[0].split() == ["NAME", "CIDRS"]
    assert table[1].split() == ["infra", "10.244.0.1,10.244.8.0/29"]
    shown = yaml.safe_load(ok(ctl("get", "reservation", "infra", "-o", "yaml")))
    assert (shown["kind"], shown["metadata"]["name"]) == ("IPReservation", "infra")
    assert shown["spec"] == {"reservedCIDRs": ["10.244.0.1", "10.244.8.0/29"]}
    assert ok(ctl("ipam", "show", "--ip", "10.244.8.3")).strip() == (
        "10.244.8.3 is not in any IP pool. IP reservation 'infra' holds it: IPAM gives it "
        "only to a pod that asks for it.")
    ok(ctl("delete", "ipreservation", "infra"))
    assert ok(ctl("get", "ipreservations")).splitlines()[1:] == []


def test_pipitctl_refuses_a_bad_reservation_in_one_sentence_writing_nothing(etcd, ctl):
    before = snapshot(etcd)
    result = ctl("apply", "-f", "-", input=RESERVATION.replace("10.244.8.0/29", "10.244.8.1/29"))
    one_sentence(result, "IPReservation 'infra'", "host bits", "10.244.8.0/29")
    assert snapshot(etcd) == before
