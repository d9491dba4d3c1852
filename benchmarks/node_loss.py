"""A node lost in the middle of a `noop-rt batch --ray` job, on Ray's own multi-node test cluster
(`ray.cluster_utils.Cluster`: a head node and worker nodes, each a raylet of its own, on one machine).

    python benchmarks/node_loss.py [--images 300] [--out DIR]   # writes DIR/node_loss.{md,json}

The head node takes no work (0 CPUs: the driver and the input blocks live there); `--nodes` worker nodes of one CPU
each host the actor pool (`--workers` actors, one per node), so one node is spare. Three runs over the same paths:
in process (the reference rows), on Ray undisturbed, and on Ray with the worker node that hosts an actor killed
(every process of the node, no graceful stop) once `--after` blocks have come back. Checked: the job finishes, every
input path is in the output exactly once, Ray delivered no row twice, every row equals the in-process row, and the
output equals the undisturbed run's. Also used by tests/test_batch_faults.py."""

from __future__ import annotations

import argparse
import io
import json
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from noop_rt.api import LoadOptions
from noop_rt.jobs.batch import BatchOptions, parts_dir, read_rows, run_batch

RESULTS = Path(__file__).resolve().parent / "results"


def start_cluster(nodes: int, cpus_per_node: int = 1) -> Any:
    """Ray's multi-node test cluster: a head node with no CPUs and `nodes` worker nodes; this process connected."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    for _ in range(nodes):
        cluster.add_node(num_cpus=cpus_per_node)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    return cluster


def stop_cluster(cluster: Any) -> None:
    import ray

    ray.shutdown()
    cluster.shutdown()


def raylet_pid(node: Any) -> int:
    return int(node.all_processes["raylet"][0].process.pid)


def actor_nodes(cluster: Any) -> list[Any]:
    """The worker nodes that host a Ray Data actor (a `MapWorker` process whose parent is the node's raylet)."""
    import psutil

    parents = set()
    for proc in psutil.process_iter(["ppid", "cmdline"]):
        if "MapWorker" in " ".join(proc.info.get("cmdline") or []):
            parents.add(proc.info["ppid"])
    return [n for n in cluster.worker_nodes if raylet_pid(n) in parents]


class NodeKiller(threading.Thread):
    """Kills one actor-hosting worker node once `after` part files of `out` exist (blocks back at the driver)."""

    def __init__(self, cluster: Any, out: Path, after: int) -> None:
        super().__init__(daemon=True)
        self.cluster, self.parts, self.after = cluster, parts_dir(out), after
        self.killed: dict[str, Any] | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        t0 = time.perf_counter()
        while not self.stop.is_set():
            done = len(list(self.parts.glob("part-*.jsonl"))) if self.parts.is_dir() else 0
            victims = actor_nodes(self.cluster) if done >= self.after else []
            if victims:
                node = victims[0]
                rows = sum(len(p.read_text().splitlines()) for p in self.parts.glob("part-*.jsonl"))
                self.killed = {"raylet_pid": raylet_pid(node), "after_s": time.perf_counter() - t0,
                               "blocks_back": done, "rows_back": rows}
                try:
                    self.cluster.remove_node(node, allow_graceful=False)
                except Exception as exc:  # the processes are killed first; say what failed after
                    self.killed["remove_error"] = f"{type(exc).__name__}: {exc}"
                self.killed["removed_s"] = time.perf_counter() - t0
                return
            time.sleep(0.05)


def differs(row: dict[str, Any], ref: dict[str, Any], tol: float) -> bool:
    if (row["label"], row["top_classes"], row["error"]) != (ref["label"], ref["top_classes"], ref["error"]):
        return True
    return any(abs(a - b) > tol for a, b in zip(row["top_errors"] or [], ref["top_errors"] or [], strict=True))


def same_rows(rows: list[dict[str, Any]], reference: dict[str, dict[str, Any]], tol: float = 1e-5) -> int:
    """How many of `rows` differ from the reference row of their path (label, ranking, errors within tol)."""
    bad = 0
    for row in rows:
        ref = reference.get(row["path"])
        bad += ref is None or differs(row, ref, tol)
    return bad


def drill(cluster: Any, listing: Path, paths: list[str], work: Path, load: LoadOptions, options: BatchOptions,
          after: int, reference: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Undisturbed and node-killed Ray runs of `listing` on `cluster` (one worker node is removed); the checks'
    figures."""
    nodes = len(cluster.worker_nodes)
    calm_out = work / "ray-calm.parquet"
    t0 = time.perf_counter()
    calm = run_batch([str(listing)], calm_out, load, options, log=io.StringIO(), show_progress=False)
    calm_s = time.perf_counter() - t0
    lost_out = work / "ray-node-lost.parquet"
    killer = NodeKiller(cluster, lost_out, after)
    killer.start()
    t0 = time.perf_counter()
    try:
        lost = run_batch([str(listing)], lost_out, load, options, log=io.StringIO(), show_progress=False)
    finally:
        killer.stop.set()
        killer.join()
    lost_s = time.perf_counter() - t0
    calm_rows, lost_rows = read_rows(calm_out), read_rows(lost_out)
    lost_paths = [r["path"] for r in lost_rows]
    strip = [{k: v for k, v in r.items() if k != "top_errors"} for r in lost_rows]
    return {"images": len(paths), "nodes": nodes, "workers": options.workers, "killed": killer.killed,
            "finished": lost.total == len(paths), "seconds": lost_s, "undisturbed_seconds": calm_s,
            "rows": len(lost_rows), "missing": len(set(paths) - set(lost_paths)),
            "duplicated": len(lost_paths) - len(set(lost_paths)),
            "rows_received_from_ray": (lost.engine or {}).get("rows_received"),
            "different_from_in_process": same_rows(lost_rows, reference),
            "different_from_undisturbed": same_rows(lost_rows, {r["path"]: r for r in calm_rows}),
            "same_order_and_columns_as_undisturbed": strip == [{k: v for k, v in r.items() if k != "top_errors"}
                                                               for r in calm_rows],
            "undisturbed_rows_received": (calm.engine or {}).get("rows_received")}


def demo_inputs(folder: Path, images: int) -> tuple[Path, list[str]]:
    """`images` distinct paths (copies of the demo's held-out digits) and a .txt file listing them."""
    from noop_rt.demo.digits import write_image_folders

    write_image_folders(folder / "digits")
    pngs = sorted((folder / "digits" / "test").rglob("*.png"))
    paths = []
    for i in range(images):
        dst = folder / "inputs" / f"{i:05d}.png"
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(pngs[i % len(pngs)], dst)
        paths.append(str(dst))
    listing = folder / "paths.txt"
    listing.write_text("\n".join(paths) + "\n")
    return listing, paths


def main() -> None:
    from noop_rt.jobs.accuracy import command_line
    from noop_rt.jobs.bench import machine_info

    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--after", type=int, default=2, help="blocks back at the driver before the kill")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp())
    try:
        listing, paths = demo_inputs(tmp, args.images)
        load = LoadOptions(backend="onnxruntime")
        ref = tmp / "in-process.parquet"
        run_batch([str(listing)], ref, load, BatchOptions(), log=io.StringIO(), show_progress=False)
        cluster = start_cluster(args.nodes)
        try:
            result = drill(cluster, listing, paths, tmp, load,
                           BatchOptions(ray=True, workers=args.workers, ray_block_size=16), args.after,
                           {r["path"]: r for r in read_rows(ref)})
        finally:
            stop_cluster(cluster)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report = {"machine": machine_info(), "command": command_line("node_loss.py"), **result}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "node_loss.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
