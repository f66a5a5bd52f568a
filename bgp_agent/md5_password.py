"""Where a TCP MD5 password (RFC 2385) is, as a resource names it, and reading it at the edge:
a BGPPeer's `password`, the BGPConfiguration's `nodeMeshPassword`. The password itself never
appears in a resource (nor in etcd, nor in `get` output): only a file on the node, or a key
of a Kubernetes Secret mounted into the agent as <secrets dir>/<name>/<key> (as a Secret
volume provides it). The agent reads it whenever it recomputes its sessions, so a rotated
file or Secret is picked up by itself.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from bgp_agent.exabgp_config import MD5_RULE, usable_md5_password
from ipam.resource import SpecReader

_SECRET_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")
_SECRET_KEY = re.compile(r"[-._a-zA-Z0-9]{1,253}")
PASSWORD_HELP = ("write it into a file and give {file: /path/to/file}, or into a Kubernetes "
                 "Secret and give {secretKeyRef: {name: SECRET, key: KEY}}")


@dataclass(frozen=True)
class PasswordRef:
    """Where a TCP MD5 password is: a file on the node, or a key of a Secret."""
    file: str | None = None
    secret: str | None = None
    key: str | None = None

    def __str__(self) -> str:
        return f"file:{self.file}" if self.file else f"secret:{self.secret}/{self.key}"

    def to_spec(self) -> dict:
        if self.file:
            return {"file": self.file}
        return {"secretKeyRef": {"name": self.secret, "key": self.key}}


class PasswordUnavailable(Exception):
    """The password a session refers to cannot be read (one sentence)."""


def parse_password(read: SpecReader, value, field: str = "password") -> PasswordRef | None:
    """The spec's `field` (where the password is), or one sentence on what is wrong."""
    if value is None:
        return None
    if isinstance(value, str):
        raise read.fail(f"{field} must not be written into the resource: {PASSWORD_HELP}.")
    if not isinstance(value, dict) or len(value) != 1 or not set(value) <= {"file",
                                                                            "secretKeyRef"}:
        raise read.fail(f"{field} must say where the password is: {PASSWORD_HELP}.")
    if "file" in value:
        path = value["file"]
        if not isinstance(path, str) or not path.startswith("/"):
            raise read.fail(f"{field} file {path!r} must be an absolute path.")
        return PasswordRef(file=path)
    ref = value["secretKeyRef"]
    if not isinstance(ref, dict) or set(ref) != {"name", "key"}:
        raise read.fail(f"{field} secretKeyRef must have exactly name and key.")
    name, key = ref["name"], ref["key"]
    if not isinstance(name, str) or not _SECRET_NAME.fullmatch(name):
        raise read.fail(f"{field} secretKeyRef name {name!r} is not a valid Secret name.")
    if not isinstance(key, str) or not _SECRET_KEY.fullmatch(key) or key in (".", ".."):
        raise read.fail(f"{field} secretKeyRef key {key!r} is not a valid Secret key "
                        "(letters, digits, '-', '_' and '.').")
    return PasswordRef(secret=name, key=key)


def resolve_password(ref: PasswordRef, secrets_dir: str | Path | None) -> str:
    """Read the password `ref` names (a trailing newline is not part of it)."""
    if ref.file:
        path = Path(ref.file)
    elif secrets_dir is None:
        raise PasswordUnavailable(f"the password is in Secret {ref.secret!r}, but the agent "
                                  "was not given a secrets directory (--secrets-dir)")
    else:
        path = Path(secrets_dir) / ref.secret / ref.key
    try:
        text = path.read_text()
    except OSError as error:
        raise PasswordUnavailable(f"the password ({ref}) cannot be read from {path}: "
                                  f"{(error.strerror or str(error)).lower()}") from None
    password = text[:-1] if text.endswith("\n") else text
    password = password[:-1] if password.endswith("\r") else password
    if not password:
        raise PasswordUnavailable(f"the password file {path} ({ref}) is empty")
    if not usable_md5_password(password):
        raise PasswordUnavailable(f"the password in {path} ({ref}) must be {MD5_RULE}")
    return password
