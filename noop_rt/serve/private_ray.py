"""Ray Serve's replicas on a loopback-only local cluster (runtime.local_ray): their inter-deployment gRPC server too.

Each Serve replica starts a gRPC server for calls from other deployments (the ingress calling the model, in Serve's
throughput-optimized mode), bound to "[::]:0", every interface, whatever the node's address
(`ray.serve._private.replica`, Ray 2.60). Called in a replica's constructor, before Serve starts that server,
`keep_grpc_on_loopback` makes it bind to the node's address instead when that address is a loopback one: the
other replicas reach it at the node's address anyway. On a node with a routable address, or a Ray whose replica
module differs, nothing changes."""

from __future__ import annotations

import ipaddress
from typing import Any


def _is_loopback(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip).is_loopback
    except ValueError:
        return False


def keep_grpc_on_loopback() -> bool:
    """True when this replica's inter-deployment gRPC server will bind to the (loopback) node address."""
    import ray

    try:
        from ray.serve._private import replica
    except ImportError:
        return False
    node_ip = ray.util.get_node_ip_address()
    original = getattr(replica, "add_port_to_grpc_server", None)
    if original is None or not _is_loopback(node_ip):
        return False
    if getattr(original, "_noop_rt_loopback", False):
        return True

    def add_port(server: Any, address: str) -> Any:
        if address.startswith("[::]:"):
            address = f"{node_ip}:{address.rsplit(':', 1)[1]}"
        return original(server, address)

    add_port._noop_rt_loopback = True  # type: ignore[attr-defined]
    replica.add_port_to_grpc_server = add_port
    return True
