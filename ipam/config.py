"""Cluster-wide IPAM settings (the IPAMConfiguration resource, name "default", as Calico's):
`pipitctl ipam configure` changes them field by field, `pipitctl apply` as a whole."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from ipam.errors import InvalidResource
from ipam.resource import SpecReader, make_document, read_document, with_metadata

KIND = "IPAMConfiguration"
NAME = "default"
# Calico's fields Pipit does not act on, and why (refused in that sentence)
UNSUPPORTED = {"kubeVirtVMAddressPersistence": "Pipit has no KubeVirt integration (a VM's pod "
                                               "keeps an address it asks for by value)."}
# maxBlocksPerHost 0 means this many, as in Calico's ipam.go (a ceiling so that one node cannot
# drain a pool by accident). A node at its limit borrows from other nodes' blocks unless
# strictAffinity is set; Calico instead refuses maxBlocksPerHost > 0 without strictAffinity.
DEFAULT_MAX_BLOCKS_PER_HOST = 20
MAX_IP_COOLDOWN_SECONDS = 1200  # Calico's bound on ipCooldownSeconds


@dataclass(frozen=True)
class IPAMConfig:
    strict_affinity: bool = False
    max_blocks_per_host: int = 0
    # Calico's ipCooldownSeconds: an address a pod gave back is not handed out again
    # automatically for this long (ipam.block.cooling); 0: as soon as its turn comes
    ip_cooldown_seconds: int = 0
    # Calico's autoAllocateBlocks: false, a node claims a block only for an address asked for
    # by value in it (and, strictAffinity being required then, never borrows)
    auto_allocate_blocks: bool = True
    labels: Mapping[str, str] = field(default_factory=dict, hash=False)
    annotations: Mapping[str, str] = field(default_factory=dict, hash=False)

    @property
    def block_limit(self) -> int:
        return self.max_blocks_per_host or DEFAULT_MAX_BLOCKS_PER_HOST


def config_from_spec(spec: Mapping, name: str = NAME) -> IPAMConfig:
    read = SpecReader(KIND, name, spec, {"strictAffinity", "maxBlocksPerHost",
                                         "ipCooldownSeconds", "autoAllocateBlocks"}, UNSUPPORTED)
    if name != NAME:
        raise read.fail(f"Pipit reads the IPAMConfiguration named {NAME!r} only.")
    limit = read.integer("maxBlocksPerHost", 0)
    if limit < 0:
        raise InvalidResource(f"maxBlocksPerHost must be 0 (meaning "
                              f"{DEFAULT_MAX_BLOCKS_PER_HOST}) or more, not {limit}.")
    cooldown = read.integer("ipCooldownSeconds", 0)
    if not 0 <= cooldown <= MAX_IP_COOLDOWN_SECONDS:
        raise InvalidResource(f"ipCooldownSeconds must be 0-{MAX_IP_COOLDOWN_SECONDS}, not "
                              f"{cooldown}.")
    strict, automatic = read.boolean("strictAffinity"), read.boolean("autoAllocateBlocks", True)
    if not strict and not automatic:
        raise InvalidResource("autoAllocateBlocks false needs strictAffinity true (as Calico): "
                              "a node that claims no block by itself must not borrow from "
                              "other nodes' blocks either.")
    return IPAMConfig(strict, limit, cooldown, automatic)


def config_to_document(config: IPAMConfig) -> dict:
    spec = {"strictAffinity": config.strict_affinity,
            "maxBlocksPerHost": config.max_blocks_per_host}
    if config.ip_cooldown_seconds:
        spec["ipCooldownSeconds"] = config.ip_cooldown_seconds
    if not config.auto_allocate_blocks:
        spec["autoAllocateBlocks"] = False
    return make_document(KIND, NAME, spec, config.labels, config.annotations)


def config_from_document(doc: Mapping) -> IPAMConfig:
    document = read_document(doc)
    return with_metadata(config_from_spec(dict(document.spec), document.name), document)
