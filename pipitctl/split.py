"""`pipitctl ipam split POOL N`: one IP pool becomes N pools of equal size, each with the
pool's settings; blocks and addresses stay where they are (each block lies in exactly one of
the new pools). Unlike calicoctl, no datastore lock is needed: the old pool goes and the new
ones come in one etcd change, guarded by the pool listing, so an allocation racing with it
fails its own pool check and decides again on the new pools."""

from __future__ import annotations

from dataclasses import replace
from ipaddress import IPv4Network

from ipam import keys
from ipam.errors import Conflict, InvalidResource, NotFound
from ipam.pool import IPPool, pool_from_document, pool_to_document
from ipam.resource import check_name
from ipam.store import Store
from ipam.txn import MAX_ATTEMPTS
from pipitctl.commit import Write, commit


def split_pool(pool: IPPool, parts: int) -> list[IPPool]:
    """The pools `pool` splits into: named split-NAME-I as calicoctl names them."""
    if parts < 2 or parts & (parts - 1):
        raise InvalidResource(f"IP pool {pool.name!r} can only be split into a power of two "
                              f"(2, 4, 8...) pools, not {parts}.")
    length = pool.cidr.prefixlen + parts.bit_length() - 1
    if length > pool.block_size:
        raise InvalidResource(f"IP pool {pool.name!r} ({pool.cidr}) cannot be split into "
                              f"{parts}: each part would be a /{length}, smaller than its "
                              f"blockSize /{pool.block_size}.")
    pools = []
    for index, cidr in enumerate(pool.cidr.subnets(new_prefix=length)):
        name = f"split-{pool.name}"[:250 - len(str(index))] + f"-{index}"
        check_name("IPPool", name)
        pools.append(replace(pool, name=name, cidr=IPv4Network(cidr)))
    return pools


async def split_stored_pool(store: Store, name: str, parts: int) -> list[IPPool]:
    for _ in range(MAX_ATTEMPTS):
        entries, revision = await store.list_with_revision(keys.POOLS)
        stored = {e.key: e for e in entries}
        entry = stored.get(keys.pool_key(name))
        if entry is None:
            raise NotFound(f"IP pool {name!r} not found.")
        new = split_pool(pool_from_document(entry.value), parts)
        taken = [p.name for p in new if keys.pool_key(p.name) in stored]
        if taken:
            raise InvalidResource(f"IP pool {taken[0]!r} exists already, so {name!r} cannot be "
                                  "split into pools of that name.")
        writes = [Write(entry.key, entry.mod_revision, None, old=entry.value)]
        writes += [Write(keys.pool_key(p.name), 0, pool_to_document(p)) for p in new]
        if await commit(store, writes, {keys.POOLS: revision}):
            return new
    raise Conflict(f"splitting IP pool {name!r} kept colliding with concurrent changes after "
                   f"{MAX_ATTEMPTS} attempts; try again.")
