"""Pipit's own small Kubernetes API server, for tests and the lab where no real kube-apiserver
can run: discovery, namespaces, nodes, pods, secrets, configmaps, events, leases, services
(a cluster IP allocated) and endpoint slices, with resourceVersions, watches (bookmarks, 410
Expired after compaction), label and field selectors, the three patch types and the real
server's Status errors. Proven against kubectl and the official Python client in
tests/test_fakekube.py. A strategic merge patch merges a list on the key its kind's type
declares at that path (a Service's ports on `port`, a container's on `containerPort`; an
EndpointSlice's are replaced whole). Not served: tables (kubectl shows NAME and AGE only) and
protobuf bodies (`kubectl create service` sends one; create from YAML instead).

    with FakeKube() as kube:                 # 127.0.0.1, a free port
        kube.write_kubeconfig(path)          # for kubectl / helm / kubernetes.config
        kube.store.compact()                 # older watches now get 410 Expired
        kube.fail(503, times=2)              # the next two requests fail
        kube.restart()                       # connections dropped, same port, same data

or as a process: `python -m tests.fakekube --port N [--kubeconfig PATH]`."""

from tests.fakekube.server import FakeKube, kubeconfig
from tests.fakekube.store import Store

__all__ = ["FakeKube", "Store", "kubeconfig"]
