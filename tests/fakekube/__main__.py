"""`python -m tests.fakekube [--host H] [--port N] [--kubeconfig PATH]`: serve until SIGTERM or
SIGINT; prints `fakekube listening on URL` once it accepts connections."""

from __future__ import annotations

import argparse
import signal
import threading

from tests.fakekube.server import FakeKube


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fakekube",
                                     description="Pipit's fake Kubernetes API server")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="default: a free port")
    parser.add_argument("--kubeconfig", help="write a kubeconfig pointing at the server here")
    parser.add_argument("--bookmark-interval", type=float, default=60.0,
                        help="seconds between watch bookmarks (default 60, as the real server)")
    args = parser.parse_args(argv)
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    with FakeKube(args.host, args.port, bookmark_interval=args.bookmark_interval) as kube:
        if args.kubeconfig:
            kube.write_kubeconfig(args.kubeconfig)
        print(f"fakekube listening on {kube.url}", flush=True)
        done.wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
