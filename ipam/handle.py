"""Handles: which blocks hold a pod's (or tunnel's) addresses, and how many in each."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from ipam.errors import InvalidResource

_HANDLE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,252}")


def check_handle_id(handle_id: str) -> str:
    if not isinstance(handle_id, str) or not _HANDLE.fullmatch(handle_id):
        raise InvalidResource(f"handle {handle_id!r} is not valid: use letters, digits, '.', "
                              "'_', ':' and '-', at most 253 characters.")
    return handle_id


@dataclass(frozen=True)
class Handle:
    handle_id: str
    blocks: Mapping[str, int] = field(default_factory=dict)  # block cidr -> addresses held

    @property
    def total(self) -> int:
        return sum(self.blocks.values())


def add(handle: Handle, cidr: str, count: int) -> Handle:
    blocks = dict(handle.blocks)
    blocks[cidr] = blocks.get(cidr, 0) + count
    return Handle(handle.handle_id, blocks)


def remove(handle: Handle, cidr: str, count: int) -> Handle:
    blocks = dict(handle.blocks)
    left = blocks.get(cidr, 0) - count
    if left > 0:
        blocks[cidr] = left
    else:
        blocks.pop(cidr, None)
    return Handle(handle.handle_id, blocks)


def to_json(handle: Handle) -> dict:
    return {"handleID": handle.handle_id, "block": dict(handle.blocks)}


def from_json(value: Mapping) -> Handle:
    return Handle(value["handleID"], dict(value.get("block") or {}))
