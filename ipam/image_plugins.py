"""pipit-install-cni: what the chart's install-cni init container runs. It copies the CNI
plugins the image holds onto the node (the host's CNI bin directory, mounted into the
container): `pipit-ipam`, the static native front (the node needs no Python), and the
reference plugins asked for (ptp, portmap, loopback... from Debian's containernetworking-plugins).

Each file is replaced atomically (a temporary file in the same directory, then rename): the
container runtime may be executing the old one at that moment. A file that already holds the
same bytes is left alone. It needs no capability: only the mounted directory's permissions.

    pipit-install-cni --to /host/opt/cni/bin --plugin ptp --plugin portmap --plugin loopback
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ipam.cni_install import _write_executable

PIPIT_BIN = "/opt/pipit/cni/bin"  # where the image keeps pipit-ipam (scripts/build-image)
REFERENCE_BIN = "/usr/lib/cni"  # Debian's containernetworking-plugins


def install(source: Path, destination: Path) -> bool:
    """Copy one executable into `destination` (a directory) atomically; False if the same
    bytes were there already."""
    content = source.read_bytes()
    target = destination / source.name
    try:
        if target.read_bytes() == content:
            return False
    except OSError:
        pass
    _write_executable(str(target), content)  # the CNI plugin's own installer's way
    return True


def sources(pipit_bin: Path, reference_bin: Path, plugins: list[str]) -> list[Path]:
    if not (pipit_bin / "pipit-ipam").is_file():
        raise ValueError(f"{pipit_bin / 'pipit-ipam'} is not in this image; build it with "
                         "scripts/build-image.")
    for name in plugins:
        if not (reference_bin / name).is_file():
            have = ", ".join(sorted(p.name for p in reference_bin.glob("*"))) or "none"
            raise ValueError(f"this image has no CNI plugin {name!r} (it has: {have}).")
    return [pipit_bin / "pipit-ipam"] + [reference_bin / name for name in plugins]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="pipit-install-cni", description=__doc__.splitlines()[0])
    parser.add_argument("--to", required=True, metavar="DIR",
                        help="the node's CNI bin directory, as mounted here")
    parser.add_argument("--plugin", action="append", default=[], metavar="NAME",
                        help="a reference plugin to install too (repeat: ptp, portmap...)")
    parser.add_argument("--from", dest="pipit_bin", default=PIPIT_BIN, metavar="DIR",
                        help=f"where pipit-ipam is (default {PIPIT_BIN})")
    parser.add_argument("--reference-plugins", default=REFERENCE_BIN, metavar="DIR",
                        help=f"where the reference plugins are (default {REFERENCE_BIN})")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    destination = Path(args.to)
    try:
        if not destination.is_dir():
            raise ValueError(f"{destination} is not a directory; mount the node's CNI bin "
                             "directory there.")
        for source in sources(Path(args.pipit_bin), Path(args.reference_plugins), args.plugin):
            changed = install(source, destination)
            print(f"{destination / source.name}: {'installed' if changed else 'up to date'}")
    except ValueError as error:
        sys.exit(f"Error: {error}")
    except OSError as error:
        sys.exit(f"Error: cannot install into {destination}: "
                 f"{(error.strerror or str(error)).lower()}.")


if __name__ == "__main__":
    main()
