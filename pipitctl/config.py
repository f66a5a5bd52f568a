"""pipitctl's configuration file: where etcd is and how to reach it (calicoctl.cfg's role).

    apiVersion: pipit.dev/v1
    kind: PipitctlConfig
    spec:
      etcdEndpoints: https://10.0.0.1:2379,https://10.0.0.2:2379
      etcdCACertFile: /etc/pipit/etcd-ca.pem      # relative paths: to the file's directory
      etcdCertFile: /etc/pipit/etcd-client.pem
      etcdKeyFile: /etc/pipit/etcd-client-key.pem
      etcdUsername: pipit                          # etcd's authentication, if it is on
      etcdPassword: ...                            # (keep the file unreadable to others)

A value given as a flag wins over the environment, which wins over the file, which wins over
the default (http://127.0.0.1:2379). The default file may be missing; a file named with
--config must exist.
"""

from __future__ import annotations

import os

from ipam.errors import InvalidResource
from ipam.resource import API_VERSION, MAX_INPUT_BYTES, load_documents, shown

DEFAULT_CONFIG = "/etc/pipit/pipitctl.yaml"
KIND = "PipitctlConfig"
# spec field -> the option it stands for, and whether it is a file path
FIELDS = {"etcdEndpoints": ("etcd_endpoints", False), "etcdCACertFile": ("etcd_ca_cert", True),
          "etcdCertFile": ("etcd_cert", True), "etcdKeyFile": ("etcd_key", True),
          "etcdUsername": ("etcd_username", False), "etcdPassword": ("etcd_password", False)}


def read_config(path: str | None) -> dict[str, str]:
    """The options the file gives, by option name (etcd_endpoints...); nothing when no file
    was named and the default one does not exist."""
    named = path is not None
    path = path or DEFAULT_CONFIG
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_INPUT_BYTES + 1)
    except FileNotFoundError:
        if named:
            raise InvalidResource(f"the configuration file {path} does not exist.") from None
        return {}
    except OSError as error:
        raise InvalidResource(f"cannot read the configuration file {path}: "
                              f"{error.strerror}.") from None
    where = f"the configuration file {path}"
    try:
        documents = load_documents(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise InvalidResource(f"{where} is not UTF-8 text.") from None
    except InvalidResource as error:
        raise InvalidResource(f"{where}: {error}") from None
    if len(documents) != 1 or not isinstance(documents[0], dict):
        raise InvalidResource(f"{where} must hold one mapping: apiVersion {API_VERSION}, kind "
                              f"{KIND} and spec.")
    document = documents[0]
    if document.get("apiVersion") != API_VERSION or document.get("kind") != KIND:
        raise InvalidResource(f"{where} must say apiVersion: {API_VERSION} and kind: {KIND}.")
    spec = document.get("spec") or {}
    unknown = sorted(set(spec) - set(FIELDS)) if isinstance(spec, dict) else ["(not a mapping)"]
    if unknown:
        raise InvalidResource(f"{where}: unknown spec field {shown(unknown[0])} (known: "
                              f"{', '.join(FIELDS)}).")
    options = {}
    for field, (option, is_path) in FIELDS.items():
        value = spec.get(field)
        if value is None or value == "":
            continue
        if not isinstance(value, str):
            raise InvalidResource(f"{where}: {field} must be a string, not {shown(value)}.")
        if is_path and not os.path.isabs(value):
            value = os.path.join(os.path.dirname(os.path.abspath(path)), value)
        options[option] = value
    return options
