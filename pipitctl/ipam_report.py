"""What `pipitctl ipam check` reports and how `pipitctl ipam release` undoes what it found.

The check's problems (ipam.snapshot.check) become a report: each problem with the addresses
it concerns and the command that fixes it. `ipam release --from-report FILE` fixes what the
report lists and a fresh check still finds, each fix one guarded transaction on fresh reads,
so a report that has gone stale (a pod started, an agent settled a claim) changes nothing
it should not:

    leaked-address          no handle: the addresses are released (each only if the same
                            handle still holds it at the same sequence); a handle that
                            exists but does not count them: it counts them again, so the
                            pod's DEL frees them
    orphan-handle           the handle counts what the blocks hold for it
    affinity-without-block, a confirmed (or half-released) claim is released; a pending
    affinity-not-owner,     one is the agent's to settle when it next allocates
    block-owned-twice
    block-of-unknown-node   the block's claim is released (it is deleted if empty, else
                            kept without an owner), as `pipitctl delete node` would
    block-without-affinity  the owner's confirmed claim is written back
    block-outside-pools     an empty block is removed; one in use needs a pool over it, or
                            its addresses released with --force first
    malformed               not pipitctl's: `etcdctl del KEY` after saving it
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network

from ipam import block as blocks
from ipam import handle as handles
from ipam import keys
from ipam.block import Release
from ipam.claim import CONFIRMED, PENDING
from ipam.errors import InvalidResource
from ipam.release import release_addresses, release_affinity, stage_handle
from ipam.resource import API_VERSION, MAX_INPUT_BYTES
from ipam.snapshot import Problem, Snapshot, check, lookup
from ipam.store import Store
from ipam.txn import Changes, transact

_CIDR = re.compile(r"\d+\.\d+\.\d+\.\d+/\d+")
REPORT_KIND = "IPAMCheckReport"
RELEASE_FROM_REPORT = "pipitctl ipam release --from-report"


# -- release --ip ------------------------------------------------------------------------------

def release_verdict(snap: Snapshot, address: IPv4Address,
                    force: bool) -> tuple[Release | None, str | None]:
    """The Release that frees `address` as the snapshot holds it (it frees nothing if the
    address has been handed out again since), or why the address is not to be released: not
    in use, a block's gateway or broadcast address, outside every pool, or held by a live
    allocation (a handle that counts it: a pod has it) unless forced."""
    info = lookup(snap, address)
    if info.pool is None and info.block is None:
        return None, f"{address} is outside every IP pool"
    reserved = info.block.reserved_as(address) if info.block is not None else ""
    if reserved:
        return None, (f"{address} is {reserved} of block {info.block.cidr}, which is never "
                      "handed out")
    if info.holder is None:
        return None, f"{address} is not in use"
    handle_id = info.holder.handle_id
    handle = snap.handles.get(handle_id)
    live = handle is not None and handle.blocks.get(str(info.block.cidr), 0) > 0
    if live and not force:
        attributes = " ".join(f"{k}={v}" for k, v in sorted(info.holder.secondary.items()))
        held_by = f"handle {handle_id}" + (f" ({attributes})" if attributes else "")
        secondary = info.holder.secondary
        holder = ("its pod" if "pod" in secondary else "its service" if "service" in secondary
                  else f"node {secondary['node']}" if "node" in secondary  # a tunnel's
                  else "what holds it")
        return None, (f"{address} is in use by {held_by}; if {holder} is gone, release it "
                      "with --force")
    return Release(address, info.sequence, handle_id), None


# -- the report -------------------------------------------------------------------------------

@dataclass(frozen=True)
class ProblemAddress:
    address: IPv4Address
    block: IPv4Network
    handle: str
    sequence: int | None


@dataclass
class Finding:
    problem: Problem
    fix: str
    addresses: list[ProblemAddress] = field(default_factory=list)

    @property
    def key(self) -> tuple[str, str, str | None]:
        """What identifies the problem in a later check (its counts may have changed)."""
        cidr = _CIDR.search(self.problem.detail)
        return self.problem.kind, self.problem.subject, cidr[0] if cidr else None


def fix_for(problem: Problem, report: str) -> str:
    """The command (or step) that fixes one problem; REPORT is the report's file name."""
    if problem.kind == "malformed":
        return f"etcdctl get {problem.subject} (to keep it), then etcdctl del {problem.subject}"
    if problem.kind == "block-owned-twice":
        return "fixed with its affinity-not-owner problems"
    if problem.kind in ("affinity-without-block", "affinity-not-owner") \
            and problem.detail.startswith(f"node {problem.subject.split('/')[0]} has a "
                                          f"{PENDING} "):
        node = problem.subject.split("/")[0]
        return (f"none needed while node {node} runs: its agent settles the claim; if the node "
                f"is gone: pipitctl delete node {node}")
    fix = f"{RELEASE_FROM_REPORT} {report}"
    if problem.kind == "block-outside-pools" and not problem.detail.endswith(" (0 in use) "
                                                                             "lies in no pool"):
        return (f"apply a pool covering {problem.subject}, or release its addresses (pipitctl "
                f"ipam release --ip ... --force) and then {fix}")
    return fix


def findings(snap: Snapshot, report: str = "REPORT") -> list[Finding]:
    found = []
    for problem in check(snap):
        finding = Finding(problem, fix_for(problem, report))
        if problem.kind == "leaked-address":
            finding.addresses = _leaked_addresses(snap, problem)
        found.append(finding)
    return found


def _leaked_addresses(snap: Snapshot, problem: Problem) -> list[ProblemAddress]:
    handle_id = problem.subject
    cidr = IPv4Network(problem.detail.split(" in ", 1)[1].split(" ", 1)[0])
    block = snap.blocks[cidr]
    return [ProblemAddress(a, cidr, handle_id, block.sequence_of(a))
            for a in blocks.addresses_of(block, handle_id)]


def report_document(snap: Snapshot, found: list[Finding]) -> dict:
    return {"apiVersion": API_VERSION, "kind": REPORT_KIND, "revision": snap.revision,
            "problems": [{
                "kind": f.problem.kind, "subject": f.problem.subject,
                "detail": f.problem.detail, "fix": f.fix,
                "addresses": [{"address": str(a.address), "block": str(a.block),
                               "handle": a.handle, "sequence": a.sequence}
                              for a in f.addresses]} for f in found]}


def read_report(path: str) -> list[Finding]:
    """The findings of a report `ipam check -o FILE` wrote; anything else is one sentence."""
    where = f"the report {path}"
    try:
        with open(path, "rb") as f:
            document = json.loads(f.read(MAX_INPUT_BYTES + 1))
        found = []
        if document.get("apiVersion") != API_VERSION or document.get("kind") != REPORT_KIND:
            raise ValueError
        for item in document["problems"]:
            finding = Finding(Problem(item["kind"], item["subject"], item["detail"]),
                              item["fix"])
            finding.addresses = [ProblemAddress(IPv4Address(a["address"]),
                                                IPv4Network(a["block"]), a["handle"],
                                                a["sequence"]) for a in item["addresses"]]
            found.append(finding)
        return found
    except OSError as error:
        raise InvalidResource(f"cannot read {where}: {error.strerror}.") from None
    except (ValueError, KeyError, TypeError, AttributeError):
        raise InvalidResource(f"{where} is not one `pipitctl ipam check -o FILE` wrote.") from None


# -- fixing what a report lists ------------------------------------------------------------

async def fix_report(store: Store, reported: list[Finding],
                     snap: Snapshot) -> tuple[list[str], list[str]]:
    """Fix each reported problem that the fresh snapshot still shows; the lines saying what
    was done, and those saying what was left (to fix by hand, or gone meanwhile)."""
    current = {f.key: f for f in findings(snap)}
    done, left = [], []
    # a node's unknown blocks before the blocks that miss an affinity (the first may settle
    # the second); releases before handle counts
    order = ("block-of-unknown-node", "affinity-not-owner", "affinity-without-block",
             "block-without-affinity", "block-outside-pools", "leaked-address",
             "orphan-handle")
    for kind in (*order, *sorted({f.problem.kind for f in reported} - set(order))):
        for finding in (f for f in reported if f.problem.kind == kind):
            problem = finding.problem
            what = f"{problem.kind} {problem.subject}"
            if finding.key not in current:
                left.append(f"{what}: no longer found")
                continue
            fix = current[finding.key].fix
            if not fix.startswith(RELEASE_FROM_REPORT):
                left.append(f"{what}: {fix}")
                continue
            done += await _fix(store, snap, finding)
    return done, left


async def _fix(store: Store, snap: Snapshot, finding: Finding) -> list[str]:
    problem = finding.problem
    kind, subject = problem.kind, problem.subject
    if kind in ("affinity-without-block", "affinity-not-owner"):
        node, _, text = subject.partition("/")
        await release_affinity(store, node, IPv4Network(text), require_empty=False)
        return [f"released node {node}'s claim on {text} ({kind})"]
    if kind == "block-of-unknown-node":
        cidr = IPv4Network(subject)
        node = snap.blocks[cidr].node
        outcome = await release_affinity(store, node, cidr, require_empty=False)
        gone = "deleted (empty)" if outcome.released else "kept without an owner"
        return [f"released block {cidr} of unregistered node {node}: {gone}"]
    if kind == "block-without-affinity":
        cidr = IPv4Network(subject)
        if await transact(store, lambda c: _restore_affinity(c, cidr), f"claiming {cidr}"):
            return [f"wrote back node {snap.blocks[cidr].node}'s claim on {cidr}"]
        return []
    if kind == "block-outside-pools":
        cidr = IPv4Network(subject)
        if await transact(store, lambda c: _remove_empty_block(c, cidr), f"removing {cidr}"):
            return [f"removed empty block {cidr}, outside every pool"]
        return []
    if kind == "leaked-address" and subject not in snap.handles:
        freed = set(await release_addresses(
            store, [Release(a.address, a.sequence, a.handle) for a in finding.addresses]))
        return [f"released {a.address} (leaked by handle {a.handle})"
                for a in finding.addresses if a.address in freed]
    if kind in ("leaked-address", "orphan-handle"):
        if await transact(store, lambda c: _recount_handle(c, subject), f"recounting {subject}"):
            return [f"handle {subject} counts what the blocks hold for it again"]
        return []
    return []


async def _restore_affinity(changes: Changes, cidr: IPv4Network) -> bool:
    entry = await changes.get(keys.block_key(cidr))
    block = blocks.from_json(entry.value) if entry else None
    if block is None or block.node is None:
        return False
    affinity = await changes.get(keys.affinity_key(block.node, cidr))
    if affinity is not None and (affinity.value or {}).get("state") == CONFIRMED:
        return False
    changes.put(keys.affinity_key(block.node, cidr), {"state": CONFIRMED})
    return True


async def _remove_empty_block(changes: Changes, cidr: IPv4Network) -> bool:
    entry = await changes.get(keys.block_key(cidr))
    block = blocks.from_json(entry.value) if entry else None
    if block is None or not block.empty:
        return False
    if block.node is not None:
        await changes.get(keys.affinity_key(block.node, cidr))
        changes.delete(keys.affinity_key(block.node, cidr))
    changes.delete(keys.block_key(cidr))
    return True


async def _recount_handle(changes: Changes, handle_id: str) -> bool:
    """The handle counts, per block it names or holds addresses in, what the block holds."""
    entry = await changes.get(keys.handle_key(handle_id))
    if entry is None:
        return False
    handle = handles.from_json(entry.value)
    held: Counter[str] = Counter()
    for block_entry in await changes.store.list(keys.BLOCKS):
        cidr = str(keys.block_cidr(block_entry.key))
        count = blocks.from_json(block_entry.value).handle_counts().get(handle_id, 0)
        if count or cidr in handle.blocks:
            changes.saw(block_entry.key, block_entry.mod_revision)
        if count:
            held[cidr] = count
    for cidr in handle.blocks:  # a block it names that is gone must stay gone
        changes.saw(keys.block_key(IPv4Network(cidr)), 0)
    recounted = handles.Handle(handle_id, dict(held))
    if recounted == handle:
        return False
    stage_handle(changes, recounted)
    return True



# -- ipam show --show-borrowed -------------------------------------------------------------

@dataclass(frozen=True)
class Borrowed:
    address: IPv4Address
    block: IPv4Network
    owner: str | None  # the block's node
    borrower: str  # the node the address was handed out on
    handle: str


def borrowed(snap: Snapshot) -> list[Borrowed]:
    """Addresses handed out on a node other than their block's owner (strictAffinity off)."""
    found = []
    for cidr, block in sorted(snap.blocks.items()):
        for ordinal, index in enumerate(block.allocations):
            if index is None:
                continue
            attribute = block.attributes[index]
            node = attribute.secondary.get("node")
            if node is not None and node != block.node:
                found.append(Borrowed(block.address(ordinal), cidr, block.node, node,
                                      attribute.handle_id))
    return found
