"""Real routers for the lab and the tests — BIRD 2, FRR 8 and GoBGP 3 — behind one small
interface, so that a test can run the same topology against each:

    router = make_router("frr", RouterSpec("tor1", router_id, 65101, peers, originate),
                         netns="pipit-t-...-tor1", directory=tmp / "tor1").start()
    wait(lambda: router.established(node_address), 30, "the session")  # lab.process.wait
    router.routes()                      # best BGP-learned routes: prefix -> RouterRoute
    router.originate([default, hijack])  # replace what the router itself announces
    router.destroy()

Each router runs in its own network namespace with its own files in `directory`; learned
routes go into that namespace's kernel table (`kernel=True`), so it forwards like a ToR.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Protocol


ROUTER_KINDS = ("bird", "frr", "gobgp")


@dataclass(frozen=True)
class RouterPeer:
    name: str  # a plain identifier (BIRD's protocol name): letters, digits, '_'
    address: IPv4Address
    peer_as: int
    local_address: IPv4Address | None = None  # the router's address towards this peer
    password: str | None = None  # TCP MD5
    hold_time: int = 90
    graceful_restart: bool = True  # act as graceful-restart helper (keep a restarting peer's routes)
    ttl_security: bool = False  # GTSM (RFC 5082) with the peer one hop away (BIRD only)


@dataclass(frozen=True)
class RouterSpec:
    name: str
    router_id: IPv4Address
    local_as: int
    peers: tuple[RouterPeer, ...] = ()
    originate: tuple[IPv4Network, ...] = ()  # announced to every peer
    kernel: bool = True  # install the best BGP routes into the namespace's kernel table


@dataclass(frozen=True)
class RouterRoute:
    prefix: IPv4Network
    next_hop: IPv4Address | None
    as_path: tuple[int, ...] = ()
    communities: tuple[tuple[int, int], ...] = ()
    peer: IPv4Address | None = None  # learned from


class FabricRouter(Protocol):
    spec: RouterSpec
    netns: str | None
    directory: Path

    def start(self, timeout: float = 20.0) -> "FabricRouter": ...
    def stop(self) -> None: ...
    def destroy(self) -> None: ...
    def established(self, address: IPv4Address) -> bool: ...
    def routes(self) -> dict[IPv4Network, RouterRoute]: ...
    def originate(self, prefixes: Iterable[IPv4Network]) -> None: ...
    def pids(self) -> list[int]: ...


def make_router(kind: str, spec: RouterSpec, netns: str | None, directory: Path) -> FabricRouter:
    if kind == "bird":
        from lab.bird import BirdRouter
        return BirdRouter(spec, netns, Path(directory))
    if kind == "frr":
        from lab.frr import FrrRouter
        return FrrRouter(spec, netns, Path(directory))
    if kind == "gobgp":
        from lab.gobgp import GoBGPRouter
        return GoBGPRouter(spec, netns, Path(directory))
    raise ValueError(f"unknown router {kind!r}; use one of {', '.join(ROUTER_KINDS)}")
