"""Pipit pipitctl."""

import os

# gRPC's C core logs connection failures (TLS handshakes...) straight to stderr; pipitctl
# reports them itself, in one sentence.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")
