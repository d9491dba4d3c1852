"""The local Ray cluster that `batch --ray` (and `serve`) start: on loopback only (runtime.local_ray). A child process
starts one the way `batch --ray` does; psutil lists the listening sockets of its session."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time

import pytest

from noop_rt.serve.launch import public_sockets

START = r"""
import sys
from noop_rt.runtime.local_ray import LOCAL_INIT, loopback_cluster
with loopback_cluster() as loopback:
    import ray
    ray.init(num_cpus=1, log_to_driver=False, logging_level="ERROR", **LOCAL_INIT)
print(loopback, ray.util.get_node_ip_address(), flush=True)
sys.stdin.read()  # held until the test has looked
ray.shutdown()
"""


@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="Ray is not installed (pip install 'noop-rt[ray]')")
def test_a_local_cluster_listens_on_loopback_only() -> None:
    import psutil

    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.Popen([sys.executable, "-c", START], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env=env, start_new_session=True)
    try:
        line = proc.stdout.readline().split() if proc.stdout else []
        assert line[:2] == ["True", "127.0.0.1"], line
        time.sleep(2)  # the agents bind their ports after ray.init returns
        sockets = []
        for p in psutil.process_iter():
            try:
                if os.getsid(p.pid) == proc.pid:
                    sockets += [(c.laddr.ip, c.laddr.port, p.name()) for c in p.net_connections(kind="inet")
                                if c.status == psutil.CONN_LISTEN]
            except (psutil.Error, OSError):
                pass
        assert any("gcs_server" in name for _, _, name in sockets), sockets
        assert public_sockets(sockets) == []
    finally:
        if proc.stdin:
            proc.stdin.close()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
