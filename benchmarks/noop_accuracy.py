"""NoOp on the demo: one learned noise (+ meta-net, + prompt tuning) vs random single noises vs the 100-noise baseline.

    python benchmarks/noop_accuracy.py [--seeds S] [--variants eps,meta,prompt] [--name noop_accuracy] [--rows-from N]
                                       [--images N] [--epochs E] [--quick] [--out DIR]
    # writes DIR/NAME.{md,json} (DIR defaults to benchmarks/results)

Few-shot data: `noop-rt demo-data` (16 shots/class for training, 30/class validation, all from the backbone's training
split); accuracy on the 360 held-out test digits. Training goes through the same code as `noop-rt train`
(`training.fewshot_split` + `training.train_checkpoint`); each trained checkpoint is saved and scored through
`noop_rt.load(..., backend="torch")`, as users run it. The shipped `noop_rt/demo/digits.pt` is written by the
command itself: `noop-rt train --model demo --data DIR --shots 16 --timestep 300 --out digits.pt` (its
`train.command` records it). `--quick` (20 test images, eps_D only, 1 epoch on 2 shots/class, 2 noise seeds, a
2-pair baseline) only proves the script runs end to end.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from noop_rt.demo import DEMO_TEMPLATE, SHOTS, VAL_SHOTS
from noop_rt.demo.digits import write_image_folders
from noop_rt.jobs.accuracy import (
    accuracy,
    command_line,
    demo_backbone,
    demo_test_set,
    mean_std,
    model_protocol,
    noop_classifier,
    protocol_lines,
    same_record,
    score_set,
    single_noise,
    single_noise_protocol,
    strategy_protocol,
    targets,
)
from noop_rt.train.backbones import load_backbone
from noop_rt.train.checkpoint import save_checkpoint
from noop_rt.train.noop import TrainConfig
from noop_rt.train.trainer import fewshot_split, train_checkpoint

RESULTS = Path(__file__).resolve().parent / "results"
LOSS = "l2"  # random-noise and baseline rows: the diffusion-classifier default

VARIANT_KEYS = ("meta_net", "prompt_tuning", "seed")  # what differs between the variants of one run


def earlier_rows(folder: Path, name: str, shots: int, val_shots: int, images: int, config: TrainConfig
                 ) -> dict[str, dict]:
    """The NoOp rows of an earlier results file, refused unless it used the same split, test images and training
    options."""
    earlier = json.loads((folder / f"{name}.json").read_text())
    got = (earlier["shots_per_class"], earlier["val_per_class"])
    if got != (shots, val_shots):
        raise SystemExit(f"error: {name}.json has shots/val {got}, this run {(shots, val_shots)}")
    if earlier["test_images"] != images:
        raise SystemExit(f"error: {name}.json was scored on {earlier['test_images']} test images, this run {images}")
    theirs = {k: v for k, v in earlier["config"].items() if k not in VARIANT_KEYS}
    ours = {k: v for k, v in config.to_dict().items() if k not in VARIANT_KEYS}
    if theirs != ours:
        differ = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
        raise SystemExit(f"error: {name}.json was trained with other options: {', '.join(differ)}")
    return {k: v for k, v in earlier["rows"].items() if "runs" in v}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--variants", default="eps,meta,prompt", help="which NoOp variants to train")
    parser.add_argument("--name", default="noop_accuracy", help="results file name")
    parser.add_argument("--val-shots", type=int, default=VAL_SHOTS, help="validation images per class")
    parser.add_argument("--timestep", type=int, default=TrainConfig().t_star, help="NoOp's t*")
    parser.add_argument("--shots", type=int, default=SHOTS)
    parser.add_argument("--seeds", type=int, default=1, help="training seeds per variant")
    parser.add_argument("--epochs", type=int, default=TrainConfig().epochs, help="training epochs")
    parser.add_argument("--noise-seeds", type=int, default=5, help="seeds of the random single-noise row")
    parser.add_argument("--baseline-noises", type=int, default=100, help="pairs of the baseline row")
    parser.add_argument("--images", type=int, default=None, help="first N held-out digits (default: all 360)")
    parser.add_argument("--rows-from", default=None, metavar="NAME",
                        help="also show the NoOp rows of results/NAME.json (same split and training options)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 20 images, eps_D, 1 epoch, 2 shots")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    args = parser.parse_args()
    if args.quick:
        args.images = args.images or 20
        args.variants, args.seeds, args.epochs, args.shots, args.val_shots = "eps", 1, 1, 2, 2
        args.noise_seeds, args.baseline_noises = 2, 2
    start = time.time()
    data = demo_test_set(args.images)
    plain = demo_backbone()  # the backbone with the plain class prompts: random-noise and baseline rows
    y_plain = targets(plain, data.names)
    base = TrainConfig(t_star=args.timestep, epochs=args.epochs)
    earlier = (earlier_rows(args.out, args.rows_from, args.shots, args.val_shots, len(data), base)
               if args.rows_from else {})
    every = {"eps": ("eps_D alone", replace(base, meta_net=False)),
             "meta": ("eps_D + meta-net", base),
             "prompt": ("eps_D + meta-net + prompt tuning", replace(base, prompt_tuning=True))}
    variants = dict(every[v.strip()] for v in args.variants.split(","))
    protocol: dict[str, Any] = {"data": data.record(), "models": {"backbone": model_protocol(plain, len(data))},
                                "training": {"config": base.to_dict(), "shots_per_class": args.shots,
                                             "val_per_class": args.val_shots, "template": DEMO_TEMPLATE,
                                             "variants": {name: {k: v for k, v in c.to_dict().items()
                                                                 if k in VARIANT_KEYS and k != "seed"}
                                                          for name, c in variants.items()},
                                             "seeds": list(range(args.seeds))},
                                "runs": {}}
    rows: dict[str, dict] = {}
    z0 = plain.model.encode(data.images)
    accs = [accuracy(single_noise(plain, z0, base.t_star, s, LOSS), y_plain) for s in range(args.noise_seeds)]
    m, s = mean_std(accs)
    label = f"one random noise at t* = {base.t_star} ({args.noise_seeds} seeds)"
    rows[label] = {"accuracy": m, "std": s, "min": min(accs), "max": max(accs),
                   "unet_evals_per_image": len(plain.classes)}
    protocol["runs"][label] = {"model": "backbone",
                               **single_noise_protocol(plain, base.t_star, range(args.noise_seeds), LOSS)}
    print(f"random single noise: {m:.4f} +- {s:.4f}", flush=True)
    backbone = load_backbone("demo")
    with tempfile.TemporaryDirectory() as tmp:
        write_image_folders(Path(tmp), shots=args.shots, val_shots=args.val_shots)
        split = fewshot_split(tmp, shots=args.shots, val_shots=args.val_shots, seed=0)
        protocol["training"]["split"] = split.source.replace(tmp, "DIR (noop-rt demo-data DIR)")
        for name, config in variants.items():
            results = []
            for seed in range(args.seeds):
                ckpt, result = train_checkpoint(backbone, split, DEMO_TEMPLATE, replace(config, seed=seed))
                path = save_checkpoint(ckpt, Path(tmp) / f"{name.replace(' ', '_')}-seed{seed}.pt")
                clf = noop_classifier(path)
                acc = accuracy(score_set(clf, data.images, "noop", chunk=64), targets(clf, data.names))
                key = f"{name}, seed {seed}"
                protocol["models"][key] = model_protocol(clf, len(data))
                protocol["models"][key]["model"]["location"] = "not kept (trained by this run)"
                protocol["runs"][key] = {"model": key, **strategy_protocol(clf, "noop")}
                clf.close()
                results.append({"seed": seed, "accuracy": acc, "val_accuracy": result.val_accuracy,
                                "best_epoch": result.best_epoch, "minutes": round(result.minutes, 2),
                                "tau": result.tau})
                print(f"{name} (seed {seed}): test {acc:.4f}, val {result.val_accuracy:.4f}, "
                      f"{result.minutes:.1f} min", flush=True)
            m, s = mean_std([r["accuracy"] for r in results])
            rows[name] = {"accuracy": m, "std": s, "runs": results, "unet_evals_per_image": len(plain.classes)}
    labels = [label for label, _ in every.values()]  # show the variants in this order, after the random noise
    for key in earlier:
        if key not in rows:
            protocol["runs"][key] = {"carried_from": f"{args.rows_from}.json"}
    rows = {**rows, **{k: v for k, v in earlier.items() if k not in rows}}
    rows = dict(sorted(rows.items(), key=lambda kv: labels.index(kv[0]) if kv[0] in labels else -1))
    n = args.baseline_noises
    run = {"model": "backbone", **strategy_protocol(plain, "baseline", pairs=n, seed=0, loss=LOSS)}
    ref = args.out / "demo_accuracy.json"
    demo = json.loads(ref.read_text()) if ref.is_file() else {}
    dp = demo.get("protocol", {})
    if (str(n) in demo.get("baseline", {}) and same_record(dp.get("data"), protocol["data"])
            and same_record(dp.get("models", {}).get("backbone"), protocol["models"]["backbone"])
            and same_record(dp.get("runs", {}).get(f"baseline N={n}"), run)):
        acc_n = demo["baseline"][str(n)]["accuracy"]
        run["measured_by"] = "demo_accuracy.py (same protocol)"
    else:
        acc_n = accuracy(score_set(plain, data.images, "baseline", desc=f"baseline N={n}", pairs=n, seed=0,
                                   loss=LOSS), y_plain)
    label = f"baseline, {n} (t, eps) pairs"
    rows[label] = {"accuracy": acc_n, "std": 0.0, "unet_evals_per_image": n * len(plain.classes)}
    protocol["runs"][label] = run
    out = {"shots_per_class": args.shots, "val_per_class": args.val_shots, "test_images": len(data),
           "t_star": base.t_star, "config": base.to_dict(), "rows_from": args.rows_from, "rows": rows,
           "minutes": round((time.time() - start) / 60, 1), "protocol": protocol}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(out, indent=2) + "\n")
    lines = [f"# NoOp on the demo: held-out accuracy ({len(data)} test digits, {args.shots} shots/class)", "",
             f"Produced by `{command_line('noop_accuracy.py')}` (2 CPU cores). "
             "Mean ± std over training seeds "
             f"where seeds > 1 (here {args.seeds}; per-seed results in {args.name}.json); over {args.noise_seeds} "
             "noise seeds for the random noise.", "",
             "| classifier | UNet evals / image | accuracy |", "|---|---|---|"]
    for name, r in rows.items():
        spread = f" ± {100 * r['std']:.1f}" if r.get("std") else ""
        runs = r.get("runs", [])
        per_seed = ", ".join(f"{100 * x['accuracy']:.1f}" for x in runs)
        each = f" (seeds: {per_seed})" if len(runs) > 1 else ""
        lines.append(f"| {name} | {r['unet_evals_per_image']} | {100 * r['accuracy']:.1f}{spread} %{each} |")
    carried = [k for k in earlier if k not in variants]
    if carried:
        lines += ["", f"Carried over from the earlier run `{args.rows_from}.json` (same split and training options; "
                  f"its command is in `{args.rows_from}.md`): {', '.join(repr(k) for k in carried)}."]
    lines += ["", f"Wall time: {out['minutes']} min (this run)."]
    lines += protocol_lines(protocol)
    (args.out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
