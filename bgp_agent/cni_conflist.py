"""The node's CNI network configuration, written by the agent (Cilium's
write-cni-conf-when-ready): only once the agent can serve IPAM, so that a container runtime
reports the node ready for pods only when they can get addresses; atomically (a temporary
file in the same directory, then rename), so that a runtime never reads half a file; again
whenever the pod MTU changes; and never removed, so that pods can still be deleted (CNI DEL)
while the agent restarts.

The content comes from a template (`--cni-conf-template`, e.g. a ConfigMap the chart mounts)
or the built-in one below, with Calico's style of placeholders replaced:

    __CNI_MTU__       the pod MTU the agent publishes for the pools' encapsulation (a number)
    __IPAM_SOCKET__   the agent's IPAM socket (--ipam-socket)
    __NODENAME__      this node's name
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from ipam.errors import InvalidResource

log = logging.getLogger("pipit-agent.cni")

DEFAULT_TEMPLATE = """\
{
  "cniVersion": "1.0.0",
  "name": "pipit",
  "plugins": [
    {"type": "ptp", "mtu": __CNI_MTU__,
     "ipam": {"type": "pipit-ipam", "socket": "__IPAM_SOCKET__"}},
    {"type": "portmap", "snat": true, "capabilities": {"portMappings": true}}
  ]
}
"""
DEFAULT_MTU = 1500  # without routing (--no-bgp) and without --mtu
EXAMPLE_MTU = 1500  # to check a template before the pod MTU is known


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cni-conf-file", metavar="PATH",
                        help="Write the node's CNI configuration here once IPAM can be "
                             "served, e.g. /host/etc/cni/net.d/10-pipit.conflist (default: "
                             "not written). It is never removed.")
    parser.add_argument("--cni-conf-template", metavar="FILE",
                        help="The configuration to write, with __CNI_MTU__, __IPAM_SOCKET__ "
                             "and __NODENAME__ replaced (default: ptp with pipit-ipam, then "
                             "portmap).")


@dataclass
class ConflistWriter:
    path: Path
    template: str
    ipam_socket: str
    node: str
    written: bool = False  # by this agent (for readiness)
    problem: str = ""  # why the last write failed

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ConflistWriter | None:
        """The writer `--cni-conf-file` asks for (None without it), its template checked
        now, before the agent serves anything."""
        if not args.cni_conf_file:
            return None
        template = DEFAULT_TEMPLATE
        if args.cni_conf_template:
            try:
                template = Path(args.cni_conf_template).read_text()
            except (OSError, UnicodeDecodeError) as error:
                raise InvalidResource(f"cannot read the CNI configuration template "
                                      f"{args.cni_conf_template}: {_reason(error)}.") from None
        writer = cls(Path(args.cni_conf_file), template, args.ipam_socket, args.node)
        writer.render(EXAMPLE_MTU)
        return writer

    def render(self, mtu: int) -> str:
        """The configuration for this pod MTU, as JSON text; a template that does not make a
        CNI network configuration is refused in one sentence."""
        text = (self.template.replace("__CNI_MTU__", str(int(mtu)))
                .replace("__IPAM_SOCKET__", _json_string_body(self.ipam_socket))
                .replace("__NODENAME__", _json_string_body(self.node)))
        where = f"the CNI configuration template ({self.template_name})"
        try:
            conf = json.loads(text)
        except ValueError as error:
            raise InvalidResource(f"{where} is not JSON once its placeholders are filled in: "
                                  f"{error}.") from None
        if not isinstance(conf, dict) or not isinstance(conf.get("name"), str):
            raise InvalidResource(f"{where} is not a network configuration: it needs a "
                                  "`name`.")
        plugins = conf.get("plugins", [conf] if "type" in conf else None)
        if not isinstance(plugins, list) or not plugins or not all(
                isinstance(p, dict) and isinstance(p.get("type"), str) for p in plugins):
            raise InvalidResource(f"{where} needs `plugins`, a list of plugins each with a "
                                  "`type`.")
        if not any(isinstance(p.get("ipam"), dict) and p["ipam"].get("type") == "pipit-ipam"
                   for p in plugins):
            raise InvalidResource(f"{where} has no plugin whose ipam type is pipit-ipam.")
        return json.dumps(conf, indent=2) + "\n"

    @property
    def template_name(self) -> str:
        return "built in" if self.template is DEFAULT_TEMPLATE else "--cni-conf-template"

    def publish(self, mtu: int) -> bool:
        """Write the configuration for this pod MTU, atomically; False if the file already
        held exactly that, or could not be written (logged, and kept in `problem`: routing
        goes on)."""
        text = self.render(mtu)
        try:
            if self.path.read_text() == text:
                self.written, self.problem = True, ""
                return False
        except (OSError, UnicodeDecodeError):
            pass
        # a name runtimes skip (they read *.conf, *.conflist and *.json), in the same directory
        # so that the rename is atomic
        temp = self.path.with_name(f".{self.path.name}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(temp, "w") as out:
                out.write(text)
                out.flush()
                os.fsync(out.fileno())
            os.chmod(temp, 0o644)
            os.replace(temp, self.path)
        except OSError as error:
            self.problem = f"cannot write {self.path}: {_reason(error)}"
            log.error("%s", self.problem)
            return False
        self.written, self.problem = True, ""
        log.info("wrote the CNI configuration %s (pod MTU %d)", self.path, mtu)
        return True

    def check(self) -> str | None:
        """For /readyz: None once the configuration is in place."""
        if self.written:
            return None
        return self.problem or "not written yet: IPAM or routing is not ready"


def _json_string_body(text: str) -> str:
    """`text` as it goes between the quotes of a JSON string."""
    return json.dumps(text)[1:-1]


def _reason(error: Exception) -> str:
    if isinstance(error, OSError) and error.strerror:
        return error.strerror.lower()
    return str(error)
