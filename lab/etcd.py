"""A real etcd server on loopback, for tests, benchmarks and the lab: free ports, a private data
directory, started and stopped (and restartable with its data) on demand; and a cluster of
several members on loopback (EtcdCluster), to kill its leader."""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from lab.process import stop_group

ETCD = shutil.which("etcd") or "/usr/bin/etcd"


_handed_out: set[int] = set()


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on, below the kernel's ephemeral range: a port the kernel chose
    (bind to 0) can be taken by any outgoing connection before the server binds it, and the
    server then exits ("address already in use"). Never the same one twice in one process."""
    low = _ephemeral_low()
    for _ in range(200):
        port = random.randrange(10000, low) if low > 11000 else 0
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            port = s.getsockname()[1]
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free port on {host}")


@dataclass
class TLSFiles:
    """Server and client certificates (from `make_tls_files`)."""
    ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str


@dataclass
class EtcdServer:
    data_dir: Path | None = None
    host: str = "127.0.0.1"
    tls: TLSFiles | None = None
    client_port: int = 0
    peer_port: int = 0
    process: subprocess.Popen | None = None
    _own_dir: bool = field(default=False, repr=False)
    log_path: Path | None = None
    unix_socket: bool = False  # also listen on a unix socket (for nodes in other netns)
    name: str = "pipit"
    initial_cluster: str = ""  # name=peer-url,... of every member (empty: a cluster of one)
    quota_bytes: int = 0  # --quota-backend-bytes (0: etcd's default, 2 GiB)
    extra_args: tuple[str, ...] = ()  # more of etcd's flags

    @property
    def peer_url(self) -> str:
        return f"http://{self.host}:{self.peer_port}"

    @property
    def endpoint(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{self.host}:{self.client_port}"

    def start(self, timeout: float = 20.0, wait: bool = True, retries: int = 2) -> EtcdServer:
        """Start it; with `wait`, until it answers (a cluster's members answer only once a
        quorum runs: start them all without waiting, then wait)."""
        chosen_here = not self.client_port and not self.peer_port
        if self.data_dir is None:
            self.data_dir = Path(tempfile.mkdtemp(prefix="pipit-etcd-"))
            self._own_dir = True
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.client_port = self.client_port or free_port(self.host)
        self.peer_port = self.peer_port or free_port(self.host)
        self.log_path = self.data_dir.with_suffix(".log")
        peer = self.peer_url
        unix = "unixs" if self.tls else "unix"  # etcd's scheme for a TLS unix listener
        listen = self.endpoint + (f",{unix}://etcd.sock:0" if self.unix_socket else "")
        cmd = [
            ETCD, "--name", self.name, "--data-dir", str(self.data_dir / "data"),
            "--listen-client-urls", listen, "--advertise-client-urls", self.endpoint,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", self.initial_cluster or f"{self.name}={peer}",
            "--log-level", "error", "--logger", "zap",
        ]
        if self.quota_bytes:
            cmd += ["--quota-backend-bytes", str(self.quota_bytes)]
        cmd += self.extra_args
        if self.tls:
            cmd += ["--cert-file", self.tls.server_cert, "--key-file", self.tls.server_key,
                    "--trusted-ca-file", self.tls.ca, "--client-cert-auth"]
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(cmd, stdout=log, stderr=log, start_new_session=True,
                                        cwd=self.data_dir)
        log.close()
        if wait:
            try:
                self._wait_ready(timeout)
            except RuntimeError:
                if not (chosen_here and retries and self._lost_its_port()):
                    raise
                self.client_port = self.peer_port = 0  # taken meanwhile: other ports
                return self.start(timeout, wait, retries - 1)
        return self

    def _lost_its_port(self) -> bool:
        """It exited because another process bound its port after free_port chose it (etcd
        binds before it writes anything in its data directory)."""
        return self.process is not None and self.process.poll() is not None and \
            b"address already in use" in self.log_path.read_bytes()

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"etcd exited with {self.process.returncode}; see {self.log_path}")
            if self._healthy():
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"etcd did not become ready within {timeout:g} s; see {self.log_path}")

    def _healthy(self) -> bool:
        cmd = ["etcdctl", "--endpoints", self.endpoint, "--dial-timeout", "1s",
               "--command-timeout", "1s", "endpoint", "health"]
        if self.tls:
            cmd += ["--cacert", self.tls.ca, "--cert", self.tls.client_cert,
                    "--key", self.tls.client_key]
        env = {**os.environ, "ETCDCTL_API": "3"}
        return subprocess.run(cmd, env=env, capture_output=True).returncode == 0

    def stop(self) -> None:
        """Stop the server, keeping its data (start() again brings it back on the same port)."""
        stop_group(self.process)
        self.process = None

    def destroy(self) -> None:
        self.stop()
        if self._own_dir and self.data_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            if self.log_path:
                self.log_path.unlink(missing_ok=True)

    def __enter__(self) -> EtcdServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.destroy()


class EtcdCluster:
    """`size` etcd members on loopback, each with its own ports and data directory."""

    def __init__(self, size: int = 3, directory: Path | None = None):
        self.directory = Path(directory or tempfile.mkdtemp(prefix="pipit-etcd-cluster-"))
        self.members = [EtcdServer(data_dir=self.directory / f"m{i}", name=f"m{i}",
                                   client_port=free_port(), peer_port=free_port())
                        for i in range(1, size + 1)]
        cluster = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        for member in self.members:
            member.initial_cluster = cluster

    @property
    def endpoints(self) -> list[str]:
        return [m.endpoint for m in self.members]

    def start(self, timeout: float = 30.0) -> EtcdCluster:
        for member in self.members:
            member.start(wait=False)
        for member in self.members:
            member._wait_ready(timeout)
        return self

    def leader(self) -> EtcdServer:
        """The member that leads now (as the running members see it)."""
        running = [m for m in self.members if m.process and m.process.poll() is None]
        out = subprocess.run(["etcdctl", "--endpoints", ",".join(m.endpoint for m in running),
                              "--dial-timeout", "2s", "endpoint", "status", "-w", "json"],
                             env={**os.environ, "ETCDCTL_API": "3"}, capture_output=True,
                             text=True).stdout
        by_endpoint = {m.endpoint: m for m in running}
        for status in json.loads(out or "[]"):
            if status["Status"]["header"]["member_id"] == status["Status"]["leader"]:
                return by_endpoint[status["Endpoint"]]
        raise RuntimeError("no etcd member says it leads")

    def destroy(self) -> None:
        for member in self.members:
            member.stop()
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> EtcdCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.destroy()


def make_tls_files(directory: Path, host: str = "127.0.0.1") -> TLSFiles:
    """A throw-away CA with a server certificate for `host` and a client certificate."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=pipit-test-ca",
        "-keyout", str(d / "ca.key"), "-out", str(d / "ca.crt"))
    for name, extension in (("server", f"subjectAltName=IP:{host},DNS:localhost"),
                            ("client", "extendedKeyUsage=clientAuth")):
        run("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN=pipit-{name}",
            "-keyout", str(d / f"{name}.key"), "-out", str(d / f"{name}.csr"))
        (d / f"{name}.ext").write_text(extension + "\n")
        run("x509", "-req", "-in", str(d / f"{name}.csr"), "-CA", str(d / "ca.crt"),
            "-CAkey", str(d / "ca.key"), "-CAcreateserial", "-days", "2",
            "-extfile", str(d / f"{name}.ext"), "-out", str(d / f"{name}.crt"))
    return TLSFiles(str(d / "ca.crt"), str(d / "server.crt"), str(d / "server.key"),
                    str(d / "client.crt"), str(d / "client.key"))
