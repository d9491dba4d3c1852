"""The local Ray cluster that `noop-rt serve` and `noop-rt batch --ray` start when given no cluster: kept on the
loopback interface, with no dashboard.

Ray picks a node address that other machines can reach, and its processes listen on it or on every interface
(the GCS, the raylet, the dashboard agent, the metrics agent, the runtime-env agent). A single-node cluster that
noop-rt starts for itself needs none of that: with `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` in the environment before
Ray is imported (Ray's own switch, meant for laptops; on Linux it is on by default), Ray takes 127.0.0.1 as the
node's address and every one of those processes binds to loopback. The server's own HTTP port is bound separately
to `--host`. A Ray Serve replica's inter-deployment gRPC server binds "[::]" whatever the node's address: see
`serve.private_ray`.

Nothing here imports Ray."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

LOOPBACK_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": the node's address is 127.0.0.1
LOCAL_INIT = {"include_dashboard": False, "dashboard_host": "127.0.0.1"}  # ray.init for a local cluster


def ray_loaded() -> bool:
    """Whether Ray's settings were already read in this process (then the switch comes too late for it)."""
    return "ray._private.ray_constants" in sys.modules


@contextmanager
def loopback_cluster() -> Iterator[bool]:
    """The environment in which `ray.init()` starts a loopback-only local cluster (this process and the cluster's
    processes, which inherit it), restored afterwards. Yields False when Ray was imported before with its settings
    already read (the cluster then takes Ray's usual address), else True."""
    saved = os.environ.get(LOOPBACK_SWITCH)
    os.environ[LOOPBACK_SWITCH] = "0"
    try:
        if ray_loaded():
            from ray._private import ray_constants

            yield not ray_constants.ENABLE_RAY_CLUSTER
        else:
            yield True
    finally:
        if saved is None:
            os.environ.pop(LOOPBACK_SWITCH, None)
        else:
            os.environ[LOOPBACK_SWITCH] = saved
