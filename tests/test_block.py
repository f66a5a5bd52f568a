"""The block logic on its own: properties that must hold for any sequence of operations."""

from ipaddress import IPv4Address, IPv4Network

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from ipam import block as blocks
from ipam.block import Release

CIDR = IPv4Network("10.1.2.0/28")


def test_assign_takes_oldest_freed_first():
    block = blocks.new_block(CIDR, "n1")
    block, first = blocks.assign(block, 3, "a")
    assert first == [IPv4Address("10.1.2.1"), IPv4Address("10.1.2.2"), IPv4Address("10.1.2.3")]
    block, _, _ = blocks.release(block, [Release(first[1])])
    block, _, _ = blocks.release(block, [Release(first[0])])
    # Never-used addresses come first (they were freed "longest ago"), then .2, then .1.
    block, rest = blocks.assign(block, block.free, "b")
    assert rest[-2:] == [first[1], first[0]]


def test_first_and_last_addresses_are_the_gateway_and_broadcast_never_handed_out():
    """Pods get ADDRESS/blockSize: the last address is their subnet's broadcast address, which
    a pod of the block pinging it would broadcast to (as host-local, it is never handed out)."""
    block = blocks.new_block(CIDR, "n1")
    assert block.gateway == CIDR.network_address and block.capacity == 14
    block, got = blocks.assign(block, 100, "all")
    assert len(got) == 14 and not {CIDR.network_address, CIDR.broadcast_address} & set(got)
    assert block.gateway == CIDR.network_address and block.free == 0
    assert block.reserved_as(CIDR.network_address) == "the gateway"
    assert block.reserved_as(CIDR.broadcast_address) == "the broadcast address"
    assert block.reserved_as(got[0]) == ""
    block, _ = blocks.release_handle(block, "all")
    for reserved, what in ((CIDR.network_address, "the gateway"),
                           (CIDR.broadcast_address, "the broadcast address")):
        with pytest.raises(ValueError, match=f"{reserved} is {what} of block {CIDR}"):
            blocks.assign_address(block, reserved, "asked")
    # Blocks too small for a gateway use every address.
    tiny = blocks.new_block(IPv4Network("10.1.3.0/31"), "n1")
    assert tiny.gateway is None and tiny.capacity == 2


def test_a_block_stored_by_an_older_version_stops_handing_out_its_broadcast_address():
    """Older versions handed out the last address: a stored block that lists it as free is
    read without it; one that holds it keeps it until its release, then never queues it."""
    free = blocks.to_json(blocks.new_block(CIDR, "n1"))
    free["unallocated"] = list(range(1, 16))  # as older versions stored a new block
    block = blocks.from_json(free)
    assert 15 not in block.unallocated and block.capacity == 14
    held = dict(free, unallocated=list(range(1, 15)), allocations=[None] * 15 + [0],
                attributes=[{"handle_id": "old", "secondary": {}}],
                sequenceNumberForAllocation={"15": 0}, sequenceNumber=1)
    block = blocks.from_json(held)
    assert block.holder(CIDR.broadcast_address).handle_id == "old"
    block, freed = blocks.release_handle(block, "old")
    assert freed == [CIDR.broadcast_address] and 15 not in block.unallocated
    assert block.reserved_as(CIDR.broadcast_address) == "the broadcast address"


def test_stale_sequence_number_frees_nothing():
    block = blocks.new_block(CIDR, "n1")
    block, [address] = blocks.assign(block, 1, "pod-a")
    old_sequence = block.sequence_of(address)
    block, freed, _ = blocks.release(block, [Release(address, sequence=old_sequence)])
    assert freed == [address]
    # The address goes to the back of the queue: drain the block until it is handed out again.
    holder = None
    while holder != "pod-b":
        block, [again] = blocks.assign(block, 1, "pod-b")
        holder = block.holder(address).handle_id if block.holder(address) else None
    assert block.sequence_of(address) != old_sequence
    block, freed, _ = blocks.release(block, [Release(address, sequence=old_sequence)])
    assert freed == [] and block.holder(address).handle_id == "pod-b"


def test_release_with_another_handle_frees_nothing():
    block, [address] = blocks.assign(blocks.new_block(CIDR, None), 1, "pod-a")
    block, freed, _ = blocks.release(block, [Release(address, handle_id="pod-b")])
    assert freed == [] and not block.empty


def test_json_round_trip_keeps_everything():
    block = blocks.new_block(CIDR, "n1")
    block, _ = blocks.assign(block, 5, "a", {"pod": "web", "namespace": "default"})
    block, freed, _ = blocks.release(block, [Release(IPv4Address("10.1.2.1"))])
    assert blocks.from_json(blocks.to_json(block)) == block


class BlockMachine(RuleBasedStateMachine):
    """Random interleavings of assign / release (by address, handle, stale sequence)."""

    def __init__(self):
        super().__init__()
        self.block = blocks.new_block(CIDR, "n1")
        self.held: dict[IPv4Address, tuple[str, int]] = {}  # model: address -> (handle, seq)
        self.retired: list[tuple[IPv4Address, int]] = []  # (address, sequence) released before
        self.counter = 0

    @rule(count=st.integers(1, 5))
    def assign(self, count):
        self.counter += 1
        handle = f"h{self.counter}"
        free_before = self.block.free
        self.block, got = blocks.assign(self.block, count, handle)
        assert len(got) == min(count, free_before)
        for address in got:
            assert address not in self.held, "address handed out twice"
            self.held[address] = (handle, self.block.sequence_of(address))

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def release_address(self, data):
        address = data.draw(st.sampled_from(sorted(self.held)))
        self.block, freed, per_handle = blocks.release(self.block, [Release(address)])
        handle, sequence = self.held.pop(address)
        assert freed == [address] and per_handle == {handle: 1}
        self.retired.append((address, sequence))

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def release_handle(self, data):
        handle = data.draw(st.sampled_from(sorted({h for h, _ in self.held.values()})))
        self.block, freed = blocks.release_handle(self.block, handle)
        expected = sorted(a for a, (h, _) in self.held.items() if h == handle)
        assert sorted(freed) == expected
        for address in expected:
            self.retired.append((address, self.held.pop(address)[1]))

    @precondition(lambda self: self.retired)
    @rule(data=st.data())
    def stale_release(self, data):
        address, sequence = data.draw(st.sampled_from(self.retired))
        before = self.block
        self.block, freed, _ = blocks.release(self.block, [Release(address, sequence=sequence)])
        assert freed == [] and self.block == before, "a stale release freed something"

    @invariant()
    def capacity_is_conserved(self):
        assert self.block.used == len(self.held)
        # minus the gateway and the broadcast address
        assert self.block.free + self.block.used == CIDR.num_addresses - 2
        assert sorted(self.block.unallocated) == sorted(
            o for o, i in enumerate(self.block.allocations) if i is None and 0 < o < 15)
        assert self.block.gateway == CIDR.network_address

    @invariant()
    def holders_match_the_model(self):
        for address, (handle, sequence) in self.held.items():
            assert self.block.holder(address).handle_id == handle
            assert self.block.sequence_of(address) == sequence


TestBlockMachine = BlockMachine.TestCase
TestBlockMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


COOLDOWN = 60


class CoolingMachine(RuleBasedStateMachine):
    """ipCooldownSeconds: random interleavings of assign, release (with the cooldown in force
    or not, by address or handle) and time passing. No address is handed out again
    automatically within COOLDOWN seconds of a release made with the cooldown in force, and
    each one is again once its cooldown has passed."""

    def __init__(self):
        super().__init__()
        self.block = blocks.new_block(CIDR, "n1")
        self.now = 1_000_000.0
        self.held: dict[IPv4Address, str] = {}
        self.freed_at: dict[IPv4Address, float] = {}  # model: released with the cooldown
        self.counter = 0

    def cooling(self) -> set[IPv4Address]:
        return {a for a, when in self.freed_at.items() if when > self.now - COOLDOWN}

    @rule(count=st.integers(1, 5))
    def assign(self, count):
        self.counter += 1
        cooling = blocks.cooling(self.block, self.now, COOLDOWN)
        assert {self.block.address(o) for o in cooling} == self.cooling()
        available = self.block.free - len(cooling)
        self.block, got = blocks.assign(self.block, count, f"h{self.counter}", skip=cooling)
        assert len(got) == min(count, available)
        assert not set(got) & self.cooling(), "handed out while cooling down"
        for address in got:
            self.held[address] = f"h{self.counter}"
            self.freed_at.pop(address, None)

    @precondition(lambda self: self.held)
    @rule(data=st.data(), in_force=st.booleans())
    def release(self, data, in_force):
        address = data.draw(st.sampled_from(sorted(self.held)))
        self.block, freed, _ = blocks.release(self.block, [Release(address)], self.now,
                                              COOLDOWN if in_force else 0)
        assert freed == [address]
        del self.held[address]
        if in_force:
            self.freed_at[address] = self.now
        else:  # the cooldown turned off: every record goes with the next release
            self.freed_at.clear()

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def release_handle_with_cooldown(self, data):
        handle = data.draw(st.sampled_from(sorted(set(self.held.values()))))
        self.block, freed = blocks.release_handle(self.block, handle, self.now, COOLDOWN)
        for address in freed:
            del self.held[address]
            self.freed_at[address] = self.now

    @rule(seconds=st.sampled_from([1, 30, 59, 60, 61, 600]))
    def time_passes(self, seconds):
        self.now += seconds

    @invariant()
    def records_are_of_free_addresses_only(self):
        assert set(self.block.released_at) <= set(self.block.unallocated)
        assert blocks.from_json(blocks.to_json(self.block)) == self.block


TestCoolingMachine = CoolingMachine.TestCase
TestCoolingMachine.settings = settings(max_examples=100, stateful_step_count=40, deadline=None)


def test_an_address_asked_for_by_value_is_given_while_it_cools_down():
    block = blocks.new_block(CIDR, "n1")
    block, [address] = blocks.assign(block, 1, "a")
    block, _, _ = blocks.release(block, [Release(address)], 1000.0, COOLDOWN)
    assert blocks.cooling(block, 1010.0, COOLDOWN) == {block.ordinal(address)}
    assert blocks.cooling(block, 1060.0, COOLDOWN) == frozenset()  # exactly its cooldown later
    block = blocks.assign_address(block, address, "b")
    assert block.holder(address).handle_id == "b" and block.released_at == {}


@given(st.lists(st.integers(1, 20), min_size=1, max_size=30))
def test_releasing_everything_restores_full_capacity(counts):
    block = blocks.new_block(IPv4Network("10.9.0.0/26"), None)
    for i, count in enumerate(counts):
        block, _ = blocks.assign(block, count, f"h{i}")
    for i in range(len(counts)):
        block, _ = blocks.release_handle(block, f"h{i}")
    assert block.empty and block.attributes == ()


def test_cni_gc_picks_this_nodes_handles_of_the_network_that_the_runtime_no_longer_has():
    from ipaddress import IPv4Network

    from ipam.block import assign, new_block
    from ipam.release import stale_attachments
    block = new_block(IPv4Network("10.244.0.0/29"), "n1")
    for handle, node in (("net.keep.eth0", "n1"), ("net.gone.eth0", "n1"),
                         ("net:2eblue.gone.eth0", "n1"), ("net.remote.eth0", "n2")):
        block, _ = assign(block, 1, handle, {"node": node})
    assert stale_attachments([block], "n1", "net.", {"net.keep.eth0"}) == ["net.gone.eth0"]


def test_cni_gc_takes_floating_ips_with_their_attachment_only():
    from ipaddress import IPv4Network

    from ipam.block import ATTACHMENT, FLOATING_FOR, assign, new_block
    from ipam.release import stale_attachments
    block = new_block(IPv4Network("10.244.0.0/29"), "n1")
    for handle in ("net.keep.eth0", "net.gone.eth0"):
        block, [pod] = assign(block, 1, handle, {"node": "n1"})
        block, _ = assign(block, 1, f"{handle}.floating",
                          {"node": "n1", FLOATING_FOR: str(pod), ATTACHMENT: handle})
    assert stale_attachments([block], "n1", "net.", {"net.keep.eth0"}) == [
        "net.gone.eth0", "net.gone.eth0.floating"]
