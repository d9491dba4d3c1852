"""NoOp on the demo: one learned noise (+ meta-net, + prompt tuning) vs random single noises vs the 100-noise baseline.

    python benchmarks/noop_accuracy.py [--seeds S] [--variants eps,meta,prompt] [--name noop_accuracy] [--rows-from N]
    # writes benchmarks/results/NAME.{md,json}

Few-shot data: `noop-rt demo-data` (16 shots/class for training, 30/class validation, all from the backbone's training
split); accuracy on the 360 held-out test digits. Training goes through the same code as `noop-rt train`
(`training.fewshot_split` + `training.train_checkpoint`). The shipped `noop_rt/demo/digits.pt` is written by the
command itself: `noop-rt train --model demo --data DIR --shots 16 --timestep 300 --out digits.pt` (its
`train.command` records it).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from noop_rt.backbone import load_backbone
from noop_rt.configs import DEMO_TEMPLATE, DIGIT_NAMES
from noop_rt.defaults import SHOTS, VAL_SHOTS
from noop_rt.demo.digits import split_tensors, write_image_folders
from noop_rt.evaluation import accuracy, baseline, mean_std, score_in_batches, single_noise
from noop_rt.noop import TrainConfig
from noop_rt.scoring import noop_scores
from noop_rt.training import fewshot_split, train_checkpoint

RESULTS = Path(__file__).resolve().parent / "results"


VARIANT_KEYS = ("meta_net", "prompt_tuning", "seed")  # what differs between the variants of one run


def earlier_rows(name: str, shots: int, val_shots: int, config: TrainConfig) -> dict[str, dict]:
    """The NoOp rows of an earlier results file, refused unless it used the same split and training options."""
    earlier = json.loads((RESULTS / f"{name}.json").read_text())
    got = (earlier["shots_per_class"], earlier["val_per_class"])
    if got != (shots, val_shots):
        raise SystemExit(f"error: {name}.json has shots/val {got}, this run {(shots, val_shots)}")
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
    parser.add_argument("--rows-from", default=None, metavar="NAME",
                        help="also show the NoOp rows of results/NAME.json (same split and training options)")
    args = parser.parse_args()
    start = time.time()
    backbone = load_backbone("demo")
    x, y = split_tensors("test")
    with torch.no_grad():
        z0 = backbone.encode(x)
    base = TrainConfig(t_star=args.timestep)
    earlier = earlier_rows(args.rows_from, args.shots, args.val_shots, base) if args.rows_from else {}
    every = {"eps": ("eps_D alone", replace(base, meta_net=False)),
             "meta": ("eps_D + meta-net", base),
             "prompt": ("eps_D + meta-net + prompt tuning", replace(base, prompt_tuning=True))}
    variants = dict(every[v.strip()] for v in args.variants.split(","))
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        write_image_folders(Path(tmp), shots=args.shots, val_shots=args.val_shots)
        split = fewshot_split(tmp, shots=args.shots, val_shots=args.val_shots, seed=0)
        # Image folders sort classes by name ("eight", "five", ...); the test labels are digit values: reorder.
        order = [split.classes.index(name) for name in DIGIT_NAMES]
        emb_plain = backbone.embed([DEMO_TEMPLATE.format(c) for c in DIGIT_NAMES])
        accs = [accuracy(single_noise(backbone, z0, emb_plain, base.t_star, s), y) for s in range(5)]
        m, s = mean_std(accs)
        rows[f"one random noise at t* = {base.t_star} (5 seeds)"] = {"accuracy": m, "std": s, "min": min(accs),
                                                         "max": max(accs), "unet_evals_per_image": 10}
        print(f"random single noise: {m:.4f} +- {s:.4f}", flush=True)
        for name, config in variants.items():
            results = []
            for seed in range(args.seeds):
                ckpt, result = train_checkpoint(backbone, split, DEMO_TEMPLATE, replace(config, seed=seed))
                noise = ckpt.noise_model()
                emb = ckpt.class_embeddings[order]

                def fn(z: torch.Tensor, noise=noise, emb=emb, ckpt=ckpt) -> object:
                    return noop_scores(backbone.predict_eps, z, noise(z), ckpt.t_star, emb, backbone.alphas_cumprod,
                                       ckpt.loss)

                acc = accuracy(score_in_batches(fn, z0, batch=64), y)
                results.append({"seed": seed, "accuracy": acc, "val_accuracy": result.val_accuracy,
                                "best_epoch": result.best_epoch, "minutes": round(result.minutes, 2),
                                "tau": result.tau})
                print(f"{name} (seed {seed}): test {acc:.4f}, val {result.val_accuracy:.4f}, "
                      f"{result.minutes:.1f} min", flush=True)
            m, s = mean_std([r["accuracy"] for r in results])
            rows[name] = {"accuracy": m, "std": s, "runs": results, "unet_evals_per_image": 10}
    labels = [label for label, _ in every.values()]  # show the variants in this order, after the random noise
    rows = {**rows, **{k: v for k, v in earlier.items() if k not in rows}}
    rows = dict(sorted(rows.items(), key=lambda kv: labels.index(kv[0]) if kv[0] in labels else -1))
    ref = RESULTS / "demo_accuracy.json"
    if ref.is_file() and "100" in json.loads(ref.read_text())["baseline"]:
        acc100 = json.loads(ref.read_text())["baseline"]["100"]["accuracy"]
    else:
        acc100 = accuracy(baseline(backbone, z0, emb_plain, 100, desc="baseline N=100"), y)
    rows["baseline, 100 (t, eps) pairs"] = {"accuracy": acc100, "std": 0.0, "unet_evals_per_image": 1000}
    out = {"shots_per_class": args.shots, "val_per_class": args.val_shots, "test_images": len(y), "t_star": base.t_star,
           "config": base.to_dict(), "rows_from": args.rows_from, "rows": rows,
           "minutes": round((time.time() - start) / 60, 1)}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(out, indent=2) + "\n")
    lines = [f"# NoOp on the demo: held-out accuracy ({len(y)} test digits, {args.shots} shots/class)", "",
             f"Produced by `python benchmarks/noop_accuracy.py --seeds {args.seeds} --variants {args.variants}"
             f" --name {args.name} --timestep {args.timestep} --val-shots {args.val_shots}"
             f"{f' --rows-from {args.rows_from}' if args.rows_from else ''}` (2 CPU cores). "
             "Mean ± std over training seeds "
             f"where seeds > 1 (here {args.seeds}; per-seed results in {args.name}.json); over 5 noise seeds for the "
             "random noise.", "",
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
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
