"""Off the training distribution: the demo's NoOp on shifted digit domains, transferred vs retrained on a few shots.

    python benchmarks/domain_shift.py [--domains printed,thick_affine] [--shots 4,8,16] [--seeds 3] [--images N]
                                      [--quick] [--out DIR] [--name domain_shift]
    # writes DIR/NAME.{md,json,png} and DIR/NAME_samples.png (DIR defaults to benchmarks/results)
    python benchmarks/domain_shift.py --render [--out DIR] [--name domain_shift]   # re-draw md/png from the JSON

Domains: `noop_rt/demo/domains.py` (generated in code, documented there). Per domain, on its test split (the first
`--images` per class order, default all), the held-out accuracy of:
- the shipped NoOp (`noop_rt/demo/digits.pt`, trained on the demo's own digits), transferred as is;
- ONE random noise at the shipped t* (mean ± std over `--noise-seeds` seeds), scored by the demo backbone with the
  plain prompts (`evaluation.single_noise`);
- NoOp retrained on the domain by the real CLI in a subprocess: `noop-rt train --model demo --data DIR --shots k
  --timestep T* --seed s --out ...` (DIR = `domains.write_domain`: a 32-per-class train pool, 30 validation images
  per class), every other option at the CLI default, which is how the shipped checkpoint was trained (its
  `train.options`); k in `--shots`, `--seeds` seeds each; each run's wall time (process) and training-loop time;
- the 100-noise baseline and pruned (Clark & Jaini) over the backbone.
Drift: the shipped bundle (`noop_rt.load()`, what `noop-rt classify` runs) classifies each domain's test split and the
demo's own 360 held-out digits; the table says whether `Classifier.drift` warned and the share of inputs below the
validation's 5th percentile of the top-1 probability. The retrained checkpoints are checked the same way on their
domain. `--quick` (20 test images, 1 domain, 2 shots, 1 seed, 1 epoch, 2 noises) only proves the script runs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

import noop_rt
from noop_rt.demo import CKPT_PATH, DIGIT_NAMES
from noop_rt.demo.domains import DOMAINS, TRAIN_POOL, VAL_PER_CLASS, domain_arrays, write_domain
from noop_rt.jobs.accuracy import (
    LabelledSet,
    accuracy,
    command_line,
    demo_backbone,
    demo_test_set,
    mean_std,
    model_protocol,
    noop_classifier,
    protocol_lines,
    score_set,
    single_noise,
    single_noise_protocol,
    strategy_protocol,
    targets,
)
from noop_rt.runtime.backends.base import installed
from noop_rt.runtime.classifier import Classifier
from noop_rt.runtime.drift import ALARM_P, WINDOW

RESULTS = Path(__file__).resolve().parent / "results"
LOSS = "l2"  # random-noise, baseline and pruned rows: the diffusion-classifier default (as noop_accuracy.py)
DRIFT_RECORD = "drift-perclass"  # the drift records' name: a new one for each change of runtime/drift.py's alarm
DOMAIN_DOC = "noop_rt/demo/domains.py (module docstring): generated in code, deterministic per (domain, split, index)"


def domain_test_set(name: str, images: int | None) -> LabelledSet:
    """The domain's test split, or its first `images // 10` images of every class (in index order)."""
    x, y = domain_arrays(name, "test")
    keep = np.arange(len(y))
    if images is not None:
        per = max(1, images // len(DIGIT_NAMES))
        keep = np.sort(np.concatenate([np.flatnonzero(y == c)[:per] for c in range(len(DIGIT_NAMES))]))
    desc = (f"domain {name!r} test split ({DOMAIN_DOC}): {DOMAINS[name].summary}; "
            f"{'all' if images is None else f'the first {images // len(DIGIT_NAMES)} per class of the'} test images "
            "as float32 [-1, 1] grey replicated to RGB (what loading the written PNGs gives)")
    return LabelledSet(np.ascontiguousarray(x[keep]), [DIGIT_NAMES[int(c)] for c in y[keep]], desc)


def drift_check(classifier: Classifier, images: np.ndarray) -> dict[str, Any]:
    """Classify `images` in order on a fresh monitor; whether it warned, the shares it reports, the accuracy."""
    if classifier.drift is None:
        return {"monitored": False}
    from noop_rt.runtime.drift import DriftMonitor

    d = classifier.drift
    classifier.drift = DriftMonitor(d.low_prob, d.high_error, d.class_rates)
    warnings: list[str] = []
    classifier.on_drift = warnings.append
    results = classifier.classify(images, top_k=1)
    report = classifier.drift.report()
    return {"monitored": True, "warned": bool(warnings), "warning": warnings[0] if warnings else None,
            "share_below_val_p05_top1_prob": report["share_below_val_p05_top1_prob"],
            "share_above_val_p95_best_error": report["share_above_val_p95_best_error"], "seen": report["seen"],
            "labels": [r.label for r in results]}


def keep_first(split: Path, per_class: int) -> int:
    """Keep the first `per_class` images (by name) of each class folder under `split`; returns how many are left."""
    left = 0
    for folder in sorted(d for d in split.iterdir() if d.is_dir()):
        for extra in sorted(folder.iterdir())[per_class:]:
            extra.unlink()
        left += len(list(folder.iterdir()))
    return left


def zero_shot_backbone(backend: str) -> Classifier:
    """The demo backbone with the plain digit prompts, for the random-noise, baseline and pruned rows: torch eager, or
    the demo bundle's encoder/noise/scorer graphs on `backend` (the same math; OpenVINO is ~2.4x faster here)."""
    if backend == "torch":
        return demo_backbone()
    from noop_rt.demo import BUNDLE_DIR, DEMO_TEMPLATE

    return noop_rt.load(BUNDLE_DIR, backend=backend, classes=list(DIGIT_NAMES), template=DEMO_TEMPLATE,
                        method="baseline")


def cli_train(data: Path, out: Path, shots: int, seed: int, t_star: int, epochs: int | None) -> dict[str, Any]:
    """`noop-rt train` in a subprocess; its JSON summary plus the process wall time and CPU time (user + sys, all
    threads: unlike wall time it does not grow when other work shares the cores or the process is paused)."""
    exe = shutil.which("noop-rt", path=str(Path(sys.executable).parent)) or shutil.which("noop-rt")
    base = [exe] if exe else [sys.executable, "-m", "noop_rt"]
    cmd = [*base, "train", "--model", "demo", "--data", str(data), "--shots", str(shots), "--timestep", str(t_star),
           "--seed", str(seed), "--out", str(out), "--json"]
    if epochs is not None:
        cmd += ["--epochs", str(epochs)]
    load_before = os.getloadavg()[0]
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    if proc.returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    summary = json.loads(proc.stdout)
    return {"summary": summary, "wall_minutes": round(wall / 60, 2), "cpu_minutes": round(cpu / 60, 2),
            "loadavg_1min_before": round(load_before, 2),
            "loadavg_1min_after": round(os.getloadavg()[0], 2), "argv_tail": cmd[len(base):]}


class Records:
    """Finished measurements kept as JSON files in a work folder, so an interrupted run resumes where it stopped
    (the key names every setting the record depends on)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.resumed: list[str] = []

    def get(self, key: str, compute: Any) -> Any:
        path = self.folder / f"{key}.json"
        if path.is_file():
            self.resumed.append(key)
            return json.loads(path.read_text())
        value = compute()
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(value))
        os.replace(tmp, path)
        return value


def plot(out: Path, domains: dict[str, dict[str, Any]], shots: list[int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(domains), figsize=(5.2 * len(domains), 4.8), squeeze=False)
    for ax, (name, d) in zip(axes[0], domains.items(), strict=True):
        rows = d["rows"]
        means = [100 * rows["retrained"][str(k)]["accuracy"] for k in shots]
        stds = [100 * rows["retrained"][str(k)]["std"] for k in shots]
        ax.errorbar(shots, means, yerr=stds, marker="o", capsize=4, label="NoOp retrained (mean ± std, seeds)")
        for k in shots:
            accs = [100 * r["accuracy"] for r in rows["retrained"][str(k)]["runs"]]
            ax.scatter([k] * len(accs), accs, s=12, color="tab:blue", alpha=0.4)
        styles = {"baseline": ("tab:green", "--"), "pruned": ("tab:olive", "-."), "transferred": ("tab:red", ":"),
                  "random_noise": ("tab:grey", ":")}
        for key, (colour, style) in styles.items():
            ax.axhline(100 * rows[key]["accuracy"], color=colour, linestyle=style, label=rows[key]["label"])
        ax.set_xscale("log", base=2)
        ax.set_xticks(shots, [str(k) for k in shots])
        ax.set_xlabel("shots per class")
        ax.set_ylabel("held-out accuracy (%)")
        ax.set_title(f"{name} ({d['test_images']} test images)")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=3, frameon=False)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(out, dpi=120)
    plt.close(fig)


def samples(out: Path, names: list[str], per_class: int = 6, zoom: int = 3) -> None:
    """The demo's held-out digits and each domain's test images side by side (a row per class)."""
    from PIL import Image, ImageDraw

    from noop_rt.demo.digits import digit_images, split_indices
    from noop_rt.demo.domains import contact_sheet

    scans, labels = digit_images()
    test = split_indices(labels)["test"]
    rows = [np.concatenate(list(scans[test][labels[test] == c][:per_class]), axis=1) for c in range(10)]
    demo = Image.fromarray(np.concatenate(rows, axis=0), mode="L")
    sheets = [("demo (training domain)", demo.resize((demo.width * zoom, demo.height * zoom),
                                                     Image.Resampling.NEAREST))]
    sheets += [(n, contact_sheet(n, "test", per_class, zoom)) for n in names]
    gap, top = 12, 16
    canvas = Image.new("L", (sum(s.width for _, s in sheets) + gap * (len(sheets) - 1), sheets[0][1].height + top),
                       color=255)
    x = 0
    draw = ImageDraw.Draw(canvas)
    for title, sheet in sheets:
        canvas.paste(sheet, (x, top))
        draw.text((x, 2), title, fill=0)
        x += sheet.width + gap
    canvas.save(out)


def render(args: argparse.Namespace) -> None:
    """Re-draw the markdown and plots of an earlier run from its JSON."""
    out = json.loads((args.out / f"{args.name}.json").read_text())
    plot(args.out / f"{args.name}.png", out["domains"], out["shots"])
    samples(args.out / f"{args.name}_samples.png", list(out["domains"]))
    (args.out / f"{args.name}.md").write_text("\n".join(report(out, args)) + "\n")


def measure_domain(name: str, args: argparse.Namespace, ctx: dict[str, Any], records: Records, work: Path
                   ) -> dict[str, Any]:
    """Every row of one domain (each finished measurement kept in `records`)."""
    plain, shipped, bundle = ctx["plain"], ctx["shipped"], ctx["bundle"]
    t_star, shots, pruned_cfg, protocol = ctx["t_star"], ctx["shots"], ctx["pruned_cfg"], ctx["protocol"]
    tag = f"images{args.images or 'all'}"
    data = domain_test_set(name, args.images)
    protocol["domains"][name] = data.record()
    folder = work / f"{name}-val{args.val_per_class}"
    counts = write_domain(name, folder, splits=("train", "val"))
    counts["val"] = keep_first(folder / "val", args.val_per_class)
    rows: dict[str, Any] = {}
    y_shipped, y_plain = targets(shipped, data.names), targets(plain, data.names)

    def transferred() -> dict[str, Any]:
        acc = accuracy(score_set(shipped, data.images, "noop", chunk=64), y_shipped)
        return {"label": "shipped NoOp, transferred", "accuracy": acc, "unet_evals_per_image": len(shipped.classes)}

    rows["transferred"] = records.get(f"{name}-{tag}-transferred", transferred)

    def shipped_drift() -> dict[str, Any]:
        drift = drift_check(bundle, data.images)
        drift["accuracy"] = float(np.mean([a == b for a, b in zip(drift.pop("labels"), data.names,
                                                                  strict=True)]))
        return drift

    drift = records.get(f"{name}-{tag}-{DRIFT_RECORD}", shipped_drift)
    print(f"[{name}] transferred {rows['transferred']['accuracy']:.4f}; drift warned {drift['warned']}",
          flush=True)

    def random_noise() -> dict[str, Any]:
        z0 = plain.model.encode(data.images)
        accs = [accuracy(single_noise(plain, z0, t_star, s, LOSS), y_plain) for s in range(args.noise_seeds)]
        m, s = mean_std(accs)
        return {"label": f"one random noise at t = {t_star} ({args.noise_seeds} seeds)", "accuracy": m,
                "std": s, "per_seed": accs, "unet_evals_per_image": len(plain.classes)}

    zs = f"{tag}-{plain.backend}"  # the zero-shot rows' records depend on the backend that scored them
    rows["random_noise"] = records.get(f"{name}-{zs}-noise{args.noise_seeds}-t{t_star}", random_noise)
    print(f"[{name}] random noise {rows['random_noise']['accuracy']:.4f} +- {rows['random_noise']['std']:.4f}",
          flush=True)
    retrained: dict[str, Any] = {}
    for k in shots:
        runs = []
        for seed in range(args.seeds):
            path = work / f"{name}-{k}shots-seed{seed}.pt"
            key = f"{name}-{tag}-k{k}-seed{seed}-t{t_star}-epochs{args.epochs or 'cli'}-val{args.val_per_class}"

            def retrain(k: int = k, seed: int = seed, path: Path = path) -> dict[str, Any]:
                trained = cli_train(folder, path, k, seed, t_star, args.epochs)
                clf = noop_classifier(path)
                acc = accuracy(score_set(clf, data.images, "noop", chunk=64), targets(clf, data.names))
                clf.close()
                s = trained["summary"]
                return {"seed": seed, "accuracy": acc, "val_accuracy": s["val_accuracy"],
                        "best_epoch": s["best_epoch"], "tau": s["tau"], "train_minutes": s["minutes"],
                        "wall_minutes": trained["wall_minutes"], "cpu_minutes": trained["cpu_minutes"],
                        "loadavg_1min_before": trained["loadavg_1min_before"],
                        "loadavg_1min_after": trained["loadavg_1min_after"], "train_images": s["train_images"],
                        "val_images": s["val_images"]}

            def own_drift(path: Path = path) -> dict[str, Any]:  # its own record: re-run when the monitor changes
                clf = noop_classifier(path)
                after = drift_check(clf, data.images)
                clf.close()
                return {"drift_warned_on_own_domain": after.get("warned"),
                        "drift_share_on_own_domain": after.get("share_below_val_p05_top1_prob")}

            run = {**records.get(key, retrain), **records.get(f"{key}-{DRIFT_RECORD}", own_drift)}
            runs.append(run)
            print(f"[{name}] {k} shots seed {seed}: test {run['accuracy']:.4f} (val {run['val_accuracy']:.4f}), "
                  f"{run['wall_minutes']:.1f} min wall, {run['cpu_minutes']:.1f} min CPU", flush=True)
        m, s = mean_std([r["accuracy"] for r in runs])
        retrained[str(k)] = {"accuracy": m, "std": s, "runs": runs, "unet_evals_per_image": len(plain.classes)}
    rows["retrained"] = retrained
    n = args.baseline_noises

    def baseline() -> dict[str, Any]:
        scores = score_set(plain, data.images, "baseline", desc=f"{name} baseline N={n}", pairs=n, seed=0,
                           loss=LOSS)
        return {"label": f"baseline, {n} (t, eps) pairs", "accuracy": accuracy(scores, y_plain),
                "unet_evals_per_image": n * len(plain.classes)}

    rows["baseline"] = records.get(f"{name}-{zs}-baseline{n}", baseline)
    print(f"[{name}] baseline {rows['baseline']['accuracy']:.4f}", flush=True)

    def pruned() -> dict[str, Any]:
        scores = score_set(plain, data.images, "pruned", desc=f"{name} pruned", **pruned_cfg)
        return {"label": "pruned (paired t-test, alpha 0.01)", "accuracy": accuracy(scores, y_plain),
                "unet_evals_per_image": float(scores.unet_evals.mean())}

    rows["pruned"] = records.get(f"{name}-{zs}-pruned{'-quick' if args.quick else ''}", pruned)
    print(f"[{name}] pruned {rows['pruned']['accuracy']:.4f}", flush=True)
    target = rows["baseline"]["accuracy"] - 0.01
    k8 = retrained.get("8")
    return {"summary": DOMAINS[name].summary, "test_images": len(data), "written": counts,
                     "rows": rows, "drift_shipped": drift,
                     "target_8_shots_ge_baseline_minus_1pt": None if k8 is None else {
                         "retrained_8_mean": k8["accuracy"], "baseline_minus_1pt": target,
                         "met": bool(k8["accuracy"] >= target)}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--domains", default="printed,thick_affine", help=f"comma list of {', '.join(DOMAINS)}")
    parser.add_argument("--shots", default="4,8,16", help="shots per class of the retrained NoOp")
    parser.add_argument("--seeds", type=int, default=3, help="training seeds per shot count")
    parser.add_argument("--noise-seeds", type=int, default=5, help="seeds of the random single-noise row")
    parser.add_argument("--baseline-noises", type=int, default=100, help="pairs of the baseline row")
    parser.add_argument("--images", type=int, default=None, help="test images per domain (default: all)")
    parser.add_argument("--epochs", type=int, default=None, help="noop-rt train --epochs (default: the CLI's)")
    parser.add_argument("--val-per-class", type=int, default=VAL_PER_CLASS, help="validation images per class "
                        f"written for training (at most {VAL_PER_CLASS}; the CLI validates on all of them each epoch)")
    parser.add_argument("--zero-shot-backend", default="openvino" if installed("openvino") else "torch",
                        help="backend of the random-noise, baseline and pruned rows: torch (the demo backbone) or "
                             "a bundle backend running the demo bundle's graphs (default openvino when installed)")
    parser.add_argument("--name", default="domain_shift", help="results file name")
    parser.add_argument("--quick", action="store_true", help="smoke run: 20 images, 1 domain, 2 shots, 1 epoch")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    parser.add_argument("--render", action="store_true", help="only re-draw NAME.md/png from NAME.json")
    parser.add_argument("--work", type=Path, default=None, help="folder of finished measurements, to resume an "
                        "interrupted run (default: TMPDIR/noop-rt-NAME-work; delete it after changing the domains)")
    args = parser.parse_args()
    if args.render:
        return render(args)
    if args.quick:
        args.images = args.images or 20
        args.domains = args.domains.split(",")[0]
        args.shots, args.seeds, args.noise_seeds, args.baseline_noises, args.epochs = "2", 1, 2, 2, 1
    names = [d.strip() for d in args.domains.split(",")]
    unknown = [d for d in names if d not in DOMAINS]
    if unknown:
        raise SystemExit(f"error: unknown domain(s) {', '.join(unknown)}; choose from {', '.join(DOMAINS)}")
    shots = [int(k) for k in args.shots.split(",")]
    if max(shots) > TRAIN_POOL:
        raise SystemExit(f"error: at most {TRAIN_POOL} shots per class (the domains' train pool)")
    start = time.time()
    work = args.work or Path(tempfile.gettempdir()) / f"noop-rt-{args.name}{'-quick' if args.quick else ''}-work"
    records = Records(work / "records")

    if not 1 <= args.val_per_class <= VAL_PER_CLASS:
        raise SystemExit(f"error: --val-per-class must be 1..{VAL_PER_CLASS}")
    plain = zero_shot_backbone(args.zero_shot_backend)  # backbone + plain prompts: random noise, baseline, pruned
    shipped = noop_classifier()  # the shipped checkpoint on the torch backend: transferred accuracy
    bundle = noop_rt.load()  # the shipped demo bundle, as `noop-rt classify` runs it: drift
    t_star = int(shipped.model.info.t_star)
    from noop_rt.train.checkpoint import load_checkpoint

    shipped_options = load_checkpoint(CKPT_PATH).train.get("options", {})
    pruned_cfg = {"loss": LOSS, **({"max_pairs": 4, "round_size": 2} if args.quick else {})}
    protocol: dict[str, Any] = {
        "domains": {}, "models": {"backbone": model_protocol(plain, 0), "shipped_noop": model_protocol(shipped, 0),
                                  "shipped_bundle": model_protocol(bundle, 0)},
        "runs": {"transferred": {"model": "shipped_noop", **strategy_protocol(shipped, "noop")},
                 "random_noise": {"model": "backbone",
                                  **single_noise_protocol(plain, t_star, range(args.noise_seeds), LOSS)},
                 "baseline": {"model": "backbone", **strategy_protocol(plain, "baseline", pairs=args.baseline_noises,
                                                                       seed=0, loss=LOSS)},
                 "pruned": {"model": "backbone", **strategy_protocol(plain, "pruned", **pruned_cfg)},
                 "drift": {"model": "shipped_bundle", "how": "Classifier.classify(test images in index order, "
                           "top_k=1) on a fresh DriftMonitor from the model's validation profile",
                           "window": WINDOW, "alarm_p": ALARM_P}},
        "training": {"command": "noop-rt train --model demo --data DIR --shots K --timestep T_STAR --seed S "
                                "--out OUT.pt --json" + (f" --epochs {args.epochs}" if args.epochs else ""),
                     "t_star": t_star, "shots": shots, "seeds": list(range(args.seeds)),
                     "data": f"DIR = domains.write_domain(domain, DIR): train/ = {TRAIN_POOL} per class (the CLI "
                             f"draws K per class with the seed), val/ = the first {args.val_per_class} per "
                             "class",
                     "shipped_checkpoint_options": shipped_options,
                     "scored_by": "noop_rt.load(OUT.pt, backend='torch', method='noop') on the test images"},
        "loss_zero_shot_rows": LOSS,
    }
    results: dict[str, Any] = {}

    control = demo_test_set(None)
    drift_demo = drift_check(bundle, control.images)
    drift_demo["accuracy"] = float(np.mean([a == b for a, b in zip(drift_demo.pop("labels"), control.names,
                                                                   strict=True)]))
    protocol["drift_control"] = control.record()
    print(f"drift on the demo's held-out digits: warned {drift_demo['warned']}, share "
          f"{drift_demo['share_below_val_p05_top1_prob']:.3f}", flush=True)

    ctx = {"plain": plain, "shipped": shipped, "bundle": bundle, "t_star": t_star, "shots": shots,
           "pruned_cfg": pruned_cfg, "protocol": protocol}
    for name in names:
        results[name] = measure_domain(name, args, ctx, records, work)

    out = {"command": command_line("domain_shift.py"), "t_star": t_star, "shots": shots, "seeds": args.seeds,
           "epochs": args.epochs, "val_per_class": args.val_per_class, "zero_shot_backend": plain.backend,
           "domains": results,
           "drift_demo_held_out": drift_demo, "minutes": round((time.time() - start) / 60, 1),
           "resumed_records": records.resumed, "protocol": protocol}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(out, indent=2) + "\n")
    plot(args.out / f"{args.name}.png", results, shots)
    samples(args.out / f"{args.name}_samples.png", names)
    (args.out / f"{args.name}.md").write_text("\n".join(report(out, args)) + "\n")
    print("\n".join(report(out, args)))


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def report(out: dict[str, Any], args: argparse.Namespace) -> list[str]:
    results, shots = out["domains"], out["shots"]
    command = out.get("command", "python benchmarks/domain_shift.py")
    lines = [f"# Domain shift: the demo's NoOp off its training digits ({', '.join(results)})", "",
             f"Produced by `{command}` (2 CPU cores, shared with other work: training "
             "times are wall times under that load, see `loadavg_*` per run in the JSON). Domains are generated in "
             "code by `noop_rt/demo/domains.py` (its docstring says how); the demo's backbone and shipped NoOp never "
             f"saw them. Retrained = `noop-rt train --model demo --shots K --timestep {out['t_star']} --seed S"
             f"{' --epochs ' + str(out['epochs']) if out.get('epochs') else ''}` in a subprocess on K shots per "
             f"class and {out.get('val_per_class', 30)} validation images per class of the domain, every other "
             f"option at the CLI default; mean ± std over {out['seeds']} seeds (per seed in brackets). Random "
             f"noise, baseline and pruned: the demo backbone with the plain prompts on "
             f"{out.get('zero_shot_backend', 'torch')}.", "",
             f"![accuracy vs shots]({args.name}.png)", "",
             f"Test images of each domain next to the demo's own held-out digits: ![samples]({args.name}_samples.png)",
             ""]
    head = "| classifier | UNet evals / image | " + " | ".join(results) + " |"
    lines += ["## Held-out accuracy", "", head, "|---|---|" + "---|" * len(results)]
    first = next(iter(results.values()))["rows"]
    for key in ("transferred", "random_noise"):
        cells = []
        for d in results.values():
            r = d["rows"][key]
            cells.append(pct(r["accuracy"]) + (f" ± {pct(r['std'])}" if "std" in r else "") + " %")
        lines.append(f"| {first[key]['label']} | {first[key]['unet_evals_per_image']} | {' | '.join(cells)} |")
    for k in shots:
        cells = []
        for d in results.values():
            r = d["rows"]["retrained"][str(k)]
            per = ", ".join(pct(x["accuracy"]) for x in r["runs"])
            cells.append(f"**{pct(r['accuracy'])} ± {pct(r['std'])} %** ({per})")
        lines.append(f"| NoOp retrained, {k} shots/class | {first['retrained'][str(k)]['unet_evals_per_image']} | "
                     f"{' | '.join(cells)} |")
    for key in ("baseline", "pruned"):
        cells = [f"{pct(d['rows'][key]['accuracy'])} %" for d in results.values()]
        evals = " / ".join(f"{d['rows'][key]['unet_evals_per_image']:.0f}" for d in results.values())
        lines.append(f"| {first[key]['label']} | {evals} | {' | '.join(cells)} |")
    lines += ["", "Test images per domain: " + ", ".join(f"{n} {d['test_images']}" for n, d in results.items())
              + ". Pruned's UNet evals are the mean per image (per domain, `/`-separated).", "",
              "## Target: NoOp retrained on 8 shots >= the 100-noise baseline - 1 point (mean over seeds)", ""]
    for name, d in results.items():
        t = d["target_8_shots_ge_baseline_minus_1pt"]
        if t is not None:
            lines.append(f"- {name}: {pct(t['retrained_8_mean'])} % vs {pct(t['baseline_minus_1pt'])} % -> "
                         f"{'met' if t['met'] else 'NOT met'}")
    lines += ["", "## Training time per run, minutes: `noop-rt train` process wall time / its CPU time (user + sys, "
              "2 threads; unlike wall time it does not grow when other work shares the cores)", "",
              "| domain | " + " | ".join(f"{k} shots" for k in shots) + " |", "|---|" + "---|" * len(shots)]
    for name, d in results.items():
        cells = []
        for k in shots:
            runs = d["rows"]["retrained"][str(k)]["runs"]
            cells.append(", ".join(f"{r['wall_minutes']:.1f}/{r.get('cpu_minutes', float('nan')):.1f}" for r in runs))
        lines.append(f"| {name} | {' | '.join(cells)} |")
    dd = out["drift_demo_held_out"]
    lines += ["", "## Drift warning (shipped bundle, `noop_rt.load()`; window 100, each input expected at its "
              "predicted class's validation share, Poisson-binomial alarm: `noop_rt/runtime/drift.py`; test images in "
              "index order)", "",
              "| images | warned | share below validation's 5th pct of top-1 prob | bundle accuracy |",
              "|---|---|---|---|",
              f"| demo's held-out digits ({dd['seen']}) | {'yes' if dd['warned'] else 'no'} | "
              f"{pct(dd['share_below_val_p05_top1_prob'])} % | {pct(dd['accuracy'])} % |"]
    for name, d in results.items():
        dr = d["drift_shipped"]
        lines.append(f"| {name} ({dr['seen']}) | {'yes' if dr['warned'] else 'no'} | "
                     f"{pct(dr['share_below_val_p05_top1_prob'])} % | {pct(dr['accuracy'])} % |")
    lines += ["", "After retraining on the domain, the retrained checkpoint's own drift monitor on the same test "
              "images (warned / runs): " + "; ".join(
                  f"{name} {k} shots {sum(bool(r['drift_warned_on_own_domain']) for r in runs)}/{len(runs)}"
                  for name, d in results.items() for k in shots
                  for runs in [d["rows"]["retrained"][str(k)]["runs"]]) + ".",
              "", f"Wall time of this invocation: {out['minutes']} min"
              + (f" ({len(out.get('resumed_records', []))} measurements resumed from earlier invocations, "
                 "their times in the tables above)." if out.get("resumed_records") else ".")]
    lines += protocol_lines(out["protocol"])
    return lines


if __name__ == "__main__":
    main()
