"""NoOp-first cascade vs NoOp, the N-noise baseline, adaptive and pruned: accuracy against mean UNet evaluations per
image, in domain (the demo's 360 held-out digits) and off it (`printed`, `thick_affine`: 100 test images each, the
sets of `domain_shift.py`), with the shipped demo bundle and no retraining.

    python benchmarks/cascade.py [--backend openvino] [--baseline-ns 1,2,5,10,25,50,100] [--quick] [--out DIR]
    # writes DIR/cascade.{md,json,png} (DIR defaults to benchmarks/results)

Every method runs through the bundle's scorer graph with its trained class embeddings, through `Classifier.score`
(the code `classify` runs): NoOp with its own loss (l1), the zero-shot strategies and the cascade's escalation
with l2. UNet evaluations are what each strategy counts per image. A (t, eps)
row's errors over all classes are computed once and kept (`PairCache`, on disk under the work folder): the baseline's
100 pairs are the pruned strategy's pairs, and the cascade's escalations re-use them, so the sweep costs little.
Caching changes no figure: a row's errors do not depend on which other rows or classes share its call.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import noop_rt
from noop_rt.demo import BUNDLE_DIR
from noop_rt.jobs.accuracy import (
    LabelledSet,
    command_line,
    demo_test_set,
    model_protocol,
    protocol_lines,
    score_set,
    strategy_protocol,
    targets,
)
from noop_rt.runtime import strategies

RESULTS = Path(__file__).resolve().parent / "results"
BASELINE_NS = (1, 2, 5, 10, 25, 50, 100)
SWEEP_THRESHOLDS = (0.5, 0.9, 0.99, 0.999)
SWEEP_SHORTLISTS = (3, 5, 8, 10)
ADAPTIVE_PAIRS = 20  # adaptive: N/10 pairs for all classes keep 5, then N (the Pets schedule scaled)
PRUNED_PAIRS = 100  # pruned: rounds of 5 shared pairs, alpha 0.01, up to the baseline's 100 pairs
ZERO_SHOT = strategies.ZERO_SHOT_LOSS  # the zero-shot rows' error norm, as the cascade's escalation uses it


class PairCache:
    """A `ScoringModel` wrapper that keeps the errors of each (z0, eps, t, loss) row per class (NaN: not scored yet)
    and scores a row only on classes it has not scored before."""

    def __init__(self, model: Any, path: Path) -> None:
        self.model, self.path = model, path
        self.rows: dict[bytes, np.ndarray] = {}
        self.computed = 0  # UNet evaluations actually run
        for saved_path in sorted(path.parent.glob(path.name.split(".")[0] + "*.npz")):  # this run's and others'
            with np.load(saved_path) as saved:
                for key, row in zip((bytes(k) for k in saved["keys"]), saved["errors"], strict=True):
                    kept = self.rows.setdefault(key, row.copy())
                    np.copyto(kept, row, where=np.isnan(kept))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)

    def class_errors(self, z0: np.ndarray, eps: np.ndarray, t: np.ndarray, classes: np.ndarray | None, loss: str,
                     progress: strategies.Progress = None) -> np.ndarray:
        keys = [hashlib.blake2b(np.ascontiguousarray(z, np.float32).tobytes()
                                + np.ascontiguousarray(e, np.float32).tobytes()
                                + f"{int(s)}:{loss}".encode(), digest_size=16).digest()
                for z, e, s in zip(z0, eps, t, strict=True)]
        wanted = np.arange(self.model.num_classes) if classes is None else np.asarray(classes)
        blank = np.full(self.model.num_classes, np.nan, np.float32)
        missing = [i for i, k in enumerate(keys) if np.isnan(self.rows.get(k, blank)[wanted]).any()]
        if missing:
            fresh = self.model.class_errors(z0[missing], eps[missing], t[missing], classes, loss)
            self.computed += fresh.size
            for i, row in zip(missing, fresh, strict=True):
                kept = self.rows.setdefault(keys[i], blank.copy())
                kept[wanted] = row
        return np.stack([self.rows[k][wanted] for k in keys])

    def save(self) -> None:
        if not self.rows:
            return
        tmp = self.path.with_name(self.path.name + ".tmp.npz")
        np.savez(tmp, keys=np.array([np.frombuffer(k, np.uint8) for k in self.rows]),
                 errors=np.stack(list(self.rows.values())))
        os.replace(tmp, self.path)


def domain_set(name: str, images: int) -> LabelledSet:
    from domain_shift import domain_test_set

    return domain_test_set(name, images)


def run_method(clf: Any, data: LabelledSet, y: np.ndarray, method: str, **options: Any) -> dict[str, Any]:
    scores = score_set(clf, data.images, method, chunk=16, **options)
    out: dict[str, Any] = {"method": method, "options": {k: v for k, v in options.items()},
                           "accuracy": float((scores.predictions() == y).mean()),
                           "unet_evals_per_image": float(scores.unet_evals.mean())}
    if scores.escalated is not None:
        esc = scores.escalated
        out["escalated_share"] = float(esc.mean())
        out["answered_accuracy"] = (float((scores.predictions()[~esc] == y[~esc]).mean()) if (~esc).any()
                                    else None)
        out["escalated_accuracy"] = float((scores.predictions()[esc] == y[esc]).mean()) if esc.any() else None
    return out


def measure(clf: Any, cache: PairCache, name: str, data: LabelledSet, args: argparse.Namespace,
            fitted: dict[str, Any]) -> dict[str, Any]:
    y = targets(clf, data.names)
    rows: list[dict[str, Any]] = []

    def add(label: str, method: str, **options: Any) -> dict[str, Any]:
        t0 = time.time()
        row = {"label": label, **run_method(clf, data, y, method, **options)}
        cache.save()
        rows.append(row)
        print(f"[{name}] {label}: {100 * row['accuracy']:.1f} % at {row['unet_evals_per_image']:.1f} evals/image "
              f"({time.time() - t0:.0f} s)", flush=True)
        return row

    if 100 in args.ns:  # first: its 100 pairs on every class are pruned's and the escalations' pairs
        add("baseline N=100", "baseline", pairs=100, seed=0, loss=ZERO_SHOT)
    add("noop", "noop")
    if not args.skip_cascade:
        fitted_row = add("cascade (fitted)", "cascade")
        fitted_row["fitted"] = True
        for th in SWEEP_THRESHOLDS:
            if th != fitted["threshold"]:
                add(f"cascade threshold {th}", "cascade", cascade_threshold=th)
        for k in SWEEP_SHORTLISTS:
            if k != fitted["shortlist"]:
                add(f"cascade shortlist {k}", "cascade", shortlist=k)
    for n in args.ns:
        if n != 100:
            add(f"baseline N={n}", "baseline", pairs=n, seed=0, loss=ZERO_SHOT)
    if name in args.zero_shot_on:
        add(f"pruned (max {PRUNED_PAIRS} pairs)", "pruned", max_pairs=PRUNED_PAIRS, seed=0, loss=ZERO_SHOT)
        add(f"adaptive (N={ADAPTIVE_PAIRS})", "adaptive", pairs=ADAPTIVE_PAIRS, seed=0, loss=ZERO_SHOT)
    return {"images": len(data), "set": data.description, "rows": rows}


def targets_met(domains: dict[str, Any]) -> list[str]:
    lines = []
    for name, d in domains.items():
        fitted = next(r for r in d["rows"] if r.get("fitted"))
        noop = next(r for r in d["rows"] if r["method"] == "noop")
        base = next((r for r in d["rows"] if r["label"] == "baseline N=100"), None)
        if name == "demo":
            ok = fitted["accuracy"] >= noop["accuracy"] and fitted["unet_evals_per_image"] <= 1.5 * \
                noop["unet_evals_per_image"]
            lines.append(f"- demo (in domain): cascade {100 * fitted['accuracy']:.1f} % at "
                         f"{fitted['unet_evals_per_image']:.1f} evals/image vs NoOp {100 * noop['accuracy']:.1f} % at "
                         f"{noop['unet_evals_per_image']:.0f} (target: accuracy >= NoOp's, evals <= 1.5x NoOp's) -> "
                         f"{'met' if ok else 'NOT met'}")
        elif base is not None:
            ok = (fitted["accuracy"] >= base["accuracy"] - 0.01
                  and fitted["unet_evals_per_image"] <= 0.3 * base["unet_evals_per_image"])
            lines.append(f"- {name}: cascade {100 * fitted['accuracy']:.1f} % at {fitted['unet_evals_per_image']:.0f} "
                         f"evals/image vs baseline N=100 {100 * base['accuracy']:.1f} % at "
                         f"{base['unet_evals_per_image']:.0f} (target: >= baseline - 1 point at <= 30 % of its "
                         f"evals) -> {'met' if ok else 'NOT met'}")
    return lines


def plot(out: Path, domains: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(domains), figsize=(5 * len(domains), 4), squeeze=False)
    for ax, (name, d) in zip(axes[0], domains.items(), strict=True):
        rows = d["rows"]
        base = sorted((r for r in rows if r["method"] == "baseline"), key=lambda r: r["unet_evals_per_image"])
        ax.plot([r["unet_evals_per_image"] for r in base], [100 * r["accuracy"] for r in base], "o-", color="grey",
                label="baseline N")
        sweep = sorted((r for r in rows if r["method"] == "cascade"), key=lambda r: r["unet_evals_per_image"])
        ax.plot([r["unet_evals_per_image"] for r in sweep], [100 * r["accuracy"] for r in sweep], "s--",
                color="tab:blue", alpha=0.6, label="cascade (sweep)")
        for method, marker, color in (("noop", "*", "tab:green"), ("pruned", "^", "tab:orange"),
                                      ("adaptive", "v", "tab:purple")):
            for r in rows:
                if r["method"] == method:
                    ax.plot(r["unet_evals_per_image"], 100 * r["accuracy"], marker, color=color, markersize=10,
                            label=method)
        fitted = next(r for r in rows if r.get("fitted"))
        ax.plot(fitted["unet_evals_per_image"], 100 * fitted["accuracy"], "D", color="tab:red", markersize=10,
                label="cascade (fitted)")
        ax.set_xscale("log")
        ax.set_title(f"{name} ({d['images']} images)")
        ax.set_xlabel("mean UNet evaluations per image (log)")
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
    handles = {}
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    axes[0][-1].legend(handles.values(), handles.keys(), fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def render(path: Path, record: dict[str, Any]) -> None:
    fitted = record["fitted_cascade"]
    lines = ["# Cascade: NoOp first, a zero-shot strategy only where NoOp is unsure or the image unfamiliar", "",
             f"Produced by `{record['command']}` ({record['machine']}). The shipped demo bundle on "
             f"`{record['backend']}`, its trained classes and prompts, no retraining; NoOp with its own loss "
             f"({record['loss']}), the zero-shot rows and the escalations with l2. The "
             f"cascade's fitted setting (from the bundle's manifest): threshold {fitted['threshold']}, shortlist "
             f"{fitted['shortlist']}, escalate {fitted['escalate']}, error bound {fitted.get('error_bound')}"
             f"{' (defaults: the bundle has no fitted cascade)' if record['defaults_used'] else ''}.", "",
             "![accuracy vs evaluations](cascade.png)", ""]
    names = list(record["domains"])
    lines += ["| method | " + " | ".join(f"{n}: accuracy | {n}: UNet evals/image" for n in names) + " |",
              "|---" * (1 + 2 * len(names)) + "|"]
    labels = list(dict.fromkeys(r["label"] for d in record["domains"].values() for r in d["rows"]))
    for label in labels:
        cells = []
        for n in names:
            r = next((r for r in record["domains"][n]["rows"] if r["label"] == label), None)
            cells += ["-", "-"] if r is None else [f"{100 * r['accuracy']:.1f} %", f"{r['unet_evals_per_image']:.1f}"]
        bold = "**" if label == "cascade (fitted)" else ""
        lines.append(f"| {bold}{label}{bold} | " + " | ".join(cells) + " |")
    lines += ["", "Escalation detail (cascade rows): share of images escalated, accuracy of the answered and of the "
              "escalated ones.", "", "| method | " + " | ".join(names) + " |", "|---" * (1 + len(names)) + "|"]
    for label in labels:
        cells = []
        for n in names:
            r = next((r for r in record["domains"][n]["rows"] if r["label"] == label), None)
            if r is None or "escalated_share" not in r:
                cells.append("-")
                continue
            ans = "-" if r["answered_accuracy"] is None else f"{100 * r['answered_accuracy']:.1f} %"
            esc = "-" if r["escalated_accuracy"] is None else f"{100 * r['escalated_accuracy']:.1f} %"
            cells.append(f"{100 * r['escalated_share']:.1f} % escalated; answered {ans}, escalated {esc}")
        if any(c != "-" for c in cells):
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "## Targets", "", *record["targets"], "",
              f"UNet evaluations run (the rest came from the pair cache): {record['unet_evals_run']}. "
              f"Wall time {record['wall_minutes']:.1f} min.", *protocol_lines(record["protocol"])]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", default="openvino")
    parser.add_argument("--baseline-ns", default=",".join(map(str, BASELINE_NS)), help="baseline N, off domain")
    parser.add_argument("--demo-baseline-ns", default=",".join(map(str, BASELINE_NS)), help="baseline N, demo")
    parser.add_argument("--demo-images", type=int, default=360)
    parser.add_argument("--domain-images", type=int, default=100)
    parser.add_argument("--domains", default="demo,printed,thick_affine")
    parser.add_argument("--quick", action="store_true", help="smoke run: 20 images per set, baseline N = 1, 2")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--work", type=Path, default=Path(".cascade_work"), help="pair cache folder")
    parser.add_argument("--cache-tag", default="", help="suffix of this run's cache file (runs in parallel; every "
                        "cache file of the folder is read)")
    parser.add_argument("--zero-shot-on", default="demo,printed,thick_affine",
                        help="the sets pruned and adaptive run on")
    parser.add_argument("--skip-cascade", action="store_true", help="fill the cache with the other methods only")
    args = parser.parse_args()
    ns = {"domain": [int(n) for n in args.baseline_ns.split(",")],
          "demo": [int(n) for n in args.demo_baseline_ns.split(",")]}
    args.zero_shot_on = args.zero_shot_on.split(",")
    if args.quick:
        args.demo_images, args.domain_images, ns = 20, 20, {"domain": [1, 2], "demo": [1, 2]}
    start = time.time()
    args.work.mkdir(parents=True, exist_ok=True)
    clf = noop_rt.load(BUNDLE_DIR, backend=args.backend, max_batch=1000)
    weights = hashlib.sha256(b"".join(hashlib.sha256(p.read_bytes()).digest() for p in sorted(BUNDLE_DIR.iterdir())
                                      if p.suffix in (".onnx", ".bin"))).hexdigest()[:16]
    cache = PairCache(clf.model, args.work / f"pairs_{weights}_{args.backend}{args.cache_tag}.npz")
    clf.model = cache  # every strategy below scores through the cache
    info = cache.model.info
    config = clf.config("cascade")
    assert isinstance(config, strategies.CascadeConfig)
    fitted = {"threshold": config.cascade_threshold, "shortlist": config.shortlist, "escalate": config.escalate,
              "error_bound": config.error_bound}
    domains: dict[str, Any] = {}
    for name in args.domains.split(","):
        data = demo_test_set(args.demo_images) if name == "demo" else domain_set(name, args.domain_images)
        args.ns = ns["demo" if name == "demo" else "domain"]
        domains[name] = measure(clf, cache, name, data, args, fitted)
    if args.skip_cascade:
        print(f"cache filled: {cache.computed} UNet evaluations run")
        return
    record: dict[str, Any] = {
        "command": command_line("cascade.py"), "backend": clf.backend, "loss": info.loss,
        "machine": f"{os.cpu_count()}-core CPU, load average {os.getloadavg()[0]:.1f} at the end",
        "fitted_cascade": fitted, "defaults_used": not info.cascade, "domains": domains,
        "targets": targets_met(domains), "unet_evals_run": cache.computed,
        "wall_minutes": (time.time() - start) / 60,
        "protocol": {"model": model_protocol(clf, 0),
                     "cascade": strategy_protocol(clf, "cascade"),
                     "baseline": {n: strategy_protocol(clf, "baseline", pairs=n, seed=0, loss=ZERO_SHOT)
                                  for n in sorted(set(ns["demo"]) | set(ns["domain"]))},
                     "pruned": strategy_protocol(clf, "pruned", max_pairs=PRUNED_PAIRS, seed=0, loss=ZERO_SHOT),
                     "adaptive": strategy_protocol(clf, "adaptive", pairs=ADAPTIVE_PAIRS, seed=0, loss=ZERO_SHOT)}}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "cascade_quick" if args.quick else "cascade"
    (args.out / f"{stem}.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    plot(args.out / f"{stem}.png", domains)
    render(args.out / f"{stem}.md", record)
    print("\n".join(record["targets"]))


if __name__ == "__main__":
    main()
