"""pipit-install-cni, what the chart's install-cni init container runs: the plugins land in
the node's CNI bin directory whole (a runtime may be executing the old file), a second run
changes nothing, and a plugin the image does not have is one sentence and a non-zero exit."""

from __future__ import annotations

import os
import stat

import pytest

from ipam import image_plugins


@pytest.fixture
def image(tmp_path):
    pipit, reference = tmp_path / "pipit", tmp_path / "reference"
    for directory, names in ((pipit, ["pipit-ipam"]), (reference, ["ptp", "portmap"])):
        directory.mkdir()
        for name in names:
            (directory / name).write_bytes(f"#!/bin/sh\necho {name}\n".encode())
    destination = tmp_path / "host-cni-bin"
    destination.mkdir()
    return pipit, reference, destination


def run(image, *plugins: str) -> None:
    pipit, reference, destination = image
    image_plugins.main(["--to", str(destination), "--from", str(pipit), "--reference-plugins",
                      str(reference), *(f"--plugin={p}" for p in plugins)])


def test_the_plugins_are_installed_executable_and_a_rerun_changes_nothing(image, capsys):
    destination = image[2]
    run(image, "ptp")
    assert sorted(os.listdir(destination)) == ["pipit-ipam", "ptp"]
    assert stat.S_IMODE(os.stat(destination / "ptp").st_mode) == 0o755
    inode = os.stat(destination / "pipit-ipam").st_ino
    run(image, "ptp")
    assert os.stat(destination / "pipit-ipam").st_ino == inode
    assert capsys.readouterr().out.splitlines()[-2:] == [
        f"{destination}/pipit-ipam: up to date", f"{destination}/ptp: up to date"]
    (image[0] / "pipit-ipam").write_bytes(b"#!/bin/sh\necho new\n")  # a new image
    run(image)
    assert (destination / "pipit-ipam").read_bytes() == b"#!/bin/sh\necho new\n"
    assert os.stat(destination / "pipit-ipam").st_ino != inode  # renamed over, not rewritten


def test_a_plugin_the_image_lacks_is_refused_before_anything_is_copied(image):
    with pytest.raises(SystemExit) as refused:
        run(image, "ptp", "vrf")
    assert str(refused.value) == ("Error: this image has no CNI plugin 'vrf' (it has: portmap, "
                                  "ptp).")
    assert os.listdir(image[2]) == []


def test_a_destination_that_is_not_mounted_is_refused(image, tmp_path):
    with pytest.raises(SystemExit, match="is not a directory; mount the node's CNI bin"):
        image_plugins.main(["--to", str(tmp_path / "missing"), "--from", str(image[0])])
