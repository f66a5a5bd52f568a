"""An OCI image archive (what scripts/build-image makes) unpacked for the lab's kubelet: its
root file system (umoci raw unpack) and its configuration (environment, entrypoint, command,
working directory), keyed by the name a pod spec uses, e.g. `pipit:0.1.0`.

The unpacked copy is kept beside the archive (`<archive>.d/`) and reused while the archive is
the same (its sha256); the lab only ever reads it (each container gets its own writable
layer).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Image:
    ref: str  # name:tag, as pod specs name it
    rootfs: Path
    config: dict  # the image configuration's `config`: Env, Entrypoint, Cmd, WorkingDir

    def to_json(self) -> dict:
        return {"ref": self.ref, "rootfs": str(self.rootfs), "config": self.config}


SOURCE_DIGEST = "opt/pipit/SOURCE-DIGEST"  # in the image: what Pipit was built from
# what the image's programs run (lab/ is in the wheel too, but nothing in a pod runs it)
_SOURCES = ("ipam", "bgp_agent", "ipip", "route_reflector", "pipitctl", "controller")


def source_digest(root: Path = Path(__file__).resolve().parent.parent) -> str:
    """A digest of the sources of the programs in Pipit's image (packages, the native
    plugin's C, pyproject.toml): an image built from other sources runs other code."""
    sha = hashlib.sha256()
    files = [root / "pyproject.toml"] + sorted(
        p for package in _SOURCES for p in (root / package).rglob("*")
        if p.suffix in (".py", ".c") and "__pycache__" not in p.parts)
    for path in files:
        sha.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return sha.hexdigest()


def built_from(image: Image) -> str:
    """The source digest recorded in the image ("" if none)."""
    try:
        return (image.rootfs / SOURCE_DIGEST).read_text().strip()
    except OSError:
        return ""


def digest(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as archive:
        for chunk in iter(lambda: archive.read(1 << 20), b""):
            sha.update(chunk)
    return sha.hexdigest()


def unpack(archive: Path, name: str = "pipit") -> Image:
    """The image in an OCI archive (one tag), unpacked once per archive content."""
    archive = Path(archive).resolve()
    if not archive.is_file():
        raise FileNotFoundError(f"no image archive at {archive}: build it with scripts/build-image")
    target = archive.with_name(archive.name + ".d")
    stamp = target / "digest"
    want = digest(archive)
    if stamp.exists() and stamp.read_text() == want and (target / "image.json").exists():
        info = json.loads((target / "image.json").read_text())
        return Image(info["ref"], target / "rootfs", info["config"])
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    with tempfile.TemporaryDirectory(dir=target) as work:
        layout = Path(work) / "layout"
        with tarfile.open(archive) as tar:
            tar.extractall(layout, filter="tar")
        index = json.loads((layout / "index.json").read_text())
        [manifest_ref] = index["manifests"]
        tag = manifest_ref.get("annotations", {}).get("org.opencontainers.image.ref.name")
        if not tag:
            raise ValueError(f"{archive} has no tagged image")
        manifest = json.loads(_blob(layout, manifest_ref["digest"]))
        config = json.loads(_blob(layout, manifest["config"]["digest"])).get("config", {})
        result = subprocess.run(["umoci", "raw", "unpack", "--image", f"{layout}:{tag}",
                                 str(target / "rootfs")], capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"umoci could not unpack {archive}: {result.stderr.strip()}")
    ref = f"{name}:{tag}"
    (target / "image.json").write_text(json.dumps({"ref": ref, "config": config}))
    stamp.write_text(want)
    return Image(ref, target / "rootfs", config)


def _blob(layout: Path, digest_text: str) -> bytes:
    algorithm, _, hexdigest = digest_text.partition(":")
    return (layout / "blobs" / algorithm / hexdigest).read_bytes()
