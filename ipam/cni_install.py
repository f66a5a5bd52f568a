"""Installing pipit-ipam into a CNI bin directory (`python -m ipam.cni install DIR`), kept out
of the plugin itself so that no plugin run carries it.

`install` writes two executables: `pipit-ipam`, the native front (cni_shim.c, built here
with the C compiler) that hands each call to the agent, and `pipit-ipam-python`, ipam/cni.py
compiled for the node's interpreter, which the front runs for what it cannot word itself.
"""

from __future__ import annotations

import sys

from ipam import cni
from ipam.cni import (
    DEFAULT_SOCKET,
    INVALID_ENVIRONMENT,
    MAX_TIMEOUT,
    SUPPORTED_VERSIONS,
    TIMEOUT,
    dumps,
)


def _node_python() -> str | None:
    """The system's python3.X of this interpreter's X.Y, if there is one: what a node has
    whatever virtualenv installs the plugin, and Debian's build starts faster (static, PGO)."""
    candidate = f"/usr/bin/python{sys.version_info[0]}.{sys.version_info[1]}"
    import os
    return candidate if os.access(candidate, os.X_OK) else None


NATIVE_SOURCE = "cni_shim.c"
PYTHON_PLUGIN = "pipit-ipam-python"  # the name cni_shim.c falls back to


def install(directory: str, python: str | None = None, native: bool = True) -> str:
    """Put the plugin into a CNI bin directory; returns the path of `pipit-ipam`.

    - `pipit-ipam-python`: this module alone, compiled (marshal) for `python` (default: the
      system's python3.X of this X.Y, else this interpreter; another must be the same X.Y)
      and run in isolated mode (-IS: no site-packages or environment; it needs neither).
      Compiling the source on every call would cost ~6 ms of each ADD.
    - `pipit-ipam`: the native front (cni_shim.c, built here with the C compiler) that hands
      each call to the agent and falls back to `pipit-ipam-python`; without `native`, the
      Python plugin itself. No C compiler, or one that fails: a ValueError says so."""
    import os

    if not os.path.isdir(directory):
        raise ValueError(f"{directory} is not a directory; create it first.")
    launcher = _python_launcher(python)
    target = os.path.join(directory, "pipit-ipam")
    _write_executable(os.path.join(directory, PYTHON_PLUGIN), launcher.encode())
    if native:
        _write_executable(target, _build_native())
    else:
        _write_executable(target, launcher.encode())
    return target


def _python_launcher(python: str | None) -> str:
    import marshal
    import os
    import subprocess

    python = python or _node_python()
    interpreter = os.path.realpath(python or sys.executable)
    if python:
        try:
            theirs = subprocess.run([interpreter, "-IS", "-c",
                                     "import sys; print(*sys.version_info[:2])"],
                                    capture_output=True, text=True, check=True).stdout.split()
            if len(theirs) != 2 or not all(part.isdigit() for part in theirs):
                raise ValueError
        except (OSError, subprocess.CalledProcessError, ValueError):
            raise ValueError(f"{python} does not run as a Python interpreter.") from None
        if tuple(map(int, theirs)) != tuple(sys.version_info[:2]):
            raise ValueError(f"{python} is Python {'.'.join(theirs)}; install with it instead "
                             f"({python} -m ipam.cni install DIR).")
    with open(cni.__file__, encoding="utf-8") as source:
        code = compile(source.read(), "ipam/cni.py (pipit-ipam)", "exec")
    version = tuple(sys.version_info[:2])
    mismatch = dumps({"cniVersion": SUPPORTED_VERSIONS[-1], "code": INVALID_ENVIRONMENT,
                      "msg": f"pipit-ipam was installed for Python {version[0]}.{version[1]}; "
                             "install it again (python -m ipam.cni install DIR)."})
    return (
        f"#!{interpreter} -IS\n"
        "# pipit-ipam, the CNI IPAM plugin of Pipit, as `python -m ipam.cni install` wrote it:\n"
        "# the code of ipam/cni.py compiled for the interpreter above.\n"
        "import marshal, sys\n"
        f"if sys.version_info[:2] != {version!r}:\n"
        f"    print({mismatch!r})\n"
        "    sys.exit(1)\n"
        f"exec(marshal.loads({marshal.dumps(code)!r}))\n")


def _build_native() -> bytes:
    """cni_shim.c compiled: static where the C library allows (a binary that runs on any
    node), else linked dynamically."""
    import os
    import shutil
    import subprocess
    import tempfile

    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        raise ValueError("no C compiler (cc) to build the native pipit-ipam; install gcc, or "
                         "install the Python plugin alone (--no-native).")
    source = os.path.join(os.path.dirname(os.path.abspath(cni.__file__)), NATIVE_SOURCE)
    constants = [  # what both fronts must say alike, from here
        "-DCNI_VERSIONS=" + ",".join(f'"{v}"' for v in SUPPORTED_VERSIONS),
        f'-DDEFAULT_SOCKET="{DEFAULT_SOCKET}"',
        f"-DDEFAULT_TIMEOUT={TIMEOUT!r}",
        f"-DMAX_TIMEOUT={MAX_TIMEOUT!r}",
    ]
    with tempfile.TemporaryDirectory(prefix="pipit-ipam-build-") as work:
        output = os.path.join(work, "pipit-ipam")
        for link in (["-static"], []):
            built = subprocess.run([compiler, "-O2", "-Wall", *constants, *link, "-o", output,
                                    source], capture_output=True, text=True)
            if built.returncode == 0:
                with open(output, "rb") as binary:
                    return binary.read()
    first = (built.stderr.strip().splitlines() or ["no message"])[0]
    raise ValueError(f"{compiler} could not build {NATIVE_SOURCE} ({first}); install gcc and "
                     "libc6-dev, or install the Python plugin alone (--no-native).")


def _write_executable(path: str, content: bytes) -> None:
    """Replace `path` at once: a runtime may be executing the old one right now."""
    import os

    tmp = path + ".tmp"
    with open(tmp, "wb") as out:
        out.write(content)
    os.chmod(tmp, 0o755)
    os.replace(tmp, path)


def install_main(argv: list[str]) -> None:
    """`python -m ipam.cni install DIR [--python PATH] [--no-native]` (argparse only here:
    the plugin's own start-up never imports it)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m ipam.cni install",
                                     description="Put pipit-ipam into a CNI bin directory.")
    parser.add_argument("directory", metavar="DIR", help="the CNI bin directory")
    parser.add_argument("--python", metavar="PATH",
                        help="the interpreter to run it with (the same X.Y as this one)")
    parser.add_argument("--no-native", dest="native", action="store_false",
                        help="install the Python plugin alone (no C compiler needed; each "
                             "call then starts an interpreter, ~8 ms of CPU)")
    args = parser.parse_args(argv)
    try:
        print(install(args.directory, args.python, args.native))
    except ValueError as error:
        sys.exit(f"Error: {error}")
    except OSError as error:
        sys.exit(f"Error: cannot install into {args.directory}: "
                 f"{(error.strerror or str(error)).lower()}.")
