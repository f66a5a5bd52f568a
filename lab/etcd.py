"""A real etcd server on loopback, for tests, benchmarks and the lab: free ports, a private data
directory, started and stopped (and restartable with its data) on demand."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from lab.process import stop_group

ETCD = shutil.which("etcd") or "/usr/bin/etcd"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


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

    @property
    def endpoint(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{self.host}:{self.client_port}"

    def start(self, timeout: float = 20.0) -> EtcdServer:
        if self.data_dir is None:
            self.data_dir = Path(tempfile.mkdtemp(prefix="pipit-etcd-"))
            self._own_dir = True
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.client_port = self.client_port or free_port(self.host)
        self.peer_port = self.peer_port or free_port(self.host)
        self.log_path = self.data_dir.with_suffix(".log")
        peer = f"http://{self.host}:{self.peer_port}"
        listen = self.endpoint + (",unix://etcd.sock:0" if self.unix_socket else "")
        cmd = [
            ETCD, "--name", "pipit", "--data-dir", str(self.data_dir / "data"),
            "--listen-client-urls", listen, "--advertise-client-urls", self.endpoint,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"pipit={peer}", "--log-level", "error", "--logger", "zap",
        ]
        if self.tls:
            cmd += ["--cert-file", self.tls.server_cert, "--key-file", self.tls.server_key,
                    "--trusted-ca-file", self.tls.ca, "--client-cert-auth"]
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(cmd, stdout=log, stderr=log, start_new_session=True,
                                        cwd=self.data_dir)
        log.close()
        self._wait_ready(timeout)
        return self

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
