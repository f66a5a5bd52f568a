"""Errors a user or operator can cause.

Every error here carries one sentence that says what is wrong and, where it helps, what to
do; the CLI prints it as is and exits non-zero, the CNI plugin maps it to an error code.
"""


class PipitError(Exception):
    """Base class: str(error) is one sentence fit to show a person."""


class InvalidResource(PipitError):
    """A resource (pool, peer, configuration, selector...) is not valid; nothing was written."""


class MalformedRequest(PipitError):
    """A request to the node's IPAM service is not JSON it can read (not an object, nested
    too deeply)."""


class NotFound(PipitError):
    """The named resource or address does not exist."""


class AlreadyExists(PipitError):
    """Create was asked for something that is already there."""


class InUse(PipitError):
    """The operation would remove something that is still in use."""


class PoolExhausted(PipitError):
    """No pool that may serve the request has a free address for this node."""


class Conflict(PipitError):
    """Concurrent writers kept changing the same keys; the operation gave up retrying."""


class DatastoreUnavailable(PipitError):
    """etcd could not be reached or did not answer in time."""
    # A write that failed this way may still have reached etcd and be applied (the request
    # went out, the answer never came): its outcome is unknown until read back.
    maybe_written = False
    # etcd answered, refusing (authentication, permissions): waiting will not change that
    refused = False
