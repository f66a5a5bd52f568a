"""The Helm chart (charts/pipit) as the lab and the tests use it: rendered with the real helm
(`render`), its objects picked out by kind and name.

    objects = render(CHART, values=[Path("my-values.yaml")], set_values={"etcd.endpoints":
                     "{http://10.0.0.1:2379}"})
    daemonset = find(objects, "DaemonSet", "pipit-node")
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "pipit"
HELM = Path(sys.executable).parent / "helm"  # scripts/setup.sh puts helm 4 into the venv
RELEASE = "pipit"
NAMESPACE = "kube-system"


class ChartError(RuntimeError):
    """helm refused to render the chart (bad values, a template error); the message is
    helm's."""


def render(chart: Path = CHART, values: Sequence[Path] = (), set_values: Mapping[str, str] = {},
           *, release: str = RELEASE, namespace: str = NAMESPACE,
           kube_version: str | None = None) -> list[dict]:
    """The objects `helm template` renders (hooks and tests included), in its order."""
    return list(yaml.safe_load_all(template(chart, values, set_values, release=release,
                                            namespace=namespace, kube_version=kube_version)))


def template(chart: Path = CHART, values: Sequence[Path] = (), set_values: Mapping[str, str] = {},
             *, release: str = RELEASE, namespace: str = NAMESPACE,
             kube_version: str | None = None) -> str:
    """`helm template` output as text."""
    argv = [str(HELM), "template", release, str(chart), "--namespace", namespace]
    if kube_version:
        argv += ["--kube-version", kube_version]
    for path in values:
        argv += ["--values", str(path)]
    for key, value in set_values.items():
        argv += ["--set", f"{key}={value}"]
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        raise ChartError(f"helm is not installed at {HELM}: run scripts/setup.sh") from None
    if result.returncode != 0:
        raise ChartError(" ".join(result.stderr.split()) or f"helm exited with "
                         f"{result.returncode}")
    return result.stdout


def find(objects: Iterable[dict], kind: str, name: str | None = None) -> dict:
    """The one rendered object of this kind (and name)."""
    found = [o for o in objects if o and o.get("kind") == kind
             and (name is None or o["metadata"]["name"] == name)]
    if len(found) != 1:
        raise LookupError(f"{len(found)} {kind} objects named {name or '(any)'} rendered")
    return found[0]


def of_kind(objects: Iterable[dict], kind: str) -> list[dict]:
    return [o for o in objects if o and o.get("kind") == kind]


def container(pod_spec: dict, name: str) -> dict:
    for entry in pod_spec.get("initContainers", []) + pod_spec.get("containers", []):
        if entry["name"] == name:
            return entry
    raise LookupError(f"no container {name} in the pod spec")
