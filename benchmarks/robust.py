"""Robust mode on the demo: clean, non-adaptive and ADAPTIVE attacked held-out accuracy of the NoOp classifier, with
and without RDC likelihood maximisation (`--robust`).

    python benchmarks/robust.py [--images 100] [--attacks pgd,bpda,full,full_smooth] [--quick] [--out DIR]
    # writes DIR/robust.{md,json}

Every attack is L_inf PGD (`noop_rt.train.robust.pgd`): eps = 8/255 of the [0, 1] range, 10 signed steps of 2/255,
random start, maximising the margin err_true - min_{c != true} err_c of the NoOp errors (Carlini-Wagner style on the
errors: the cross-entropy of softmax(-tau * err) saturates at the large fitted tau and masks the gradient). The attacked
model is the torch backend's `classifier` graph module (encoder, meta-net noise, UNet at t*: what `export` traces),
and the attacks differ in what they differentiate:
- `pgd` (non-adaptive): the plain classifier; robust mode then purifies the attacked input. An upper bound.
- `bpda`: classifier(purify(x)) with the purification's backward pass replaced by the identity (BPDA, as RDC's own
  evaluation code treats its likelihood maximiser).
- `full`: classifier(purify(x)) differentiated exactly, through every likelihood-maximisation step (the graph of
  each step's gradient kept: second order through the UNet). With signed steps the exact derivative of the
  purification is the identity masked where the [-1, 1] clip binds, so this is BPDA without the saturated pixels.
- `full_smooth`: as `full` with each step's sign given the backward pass of tanh(g / mean|g|)
  (`robust.smooth_sign`), so the attacker sees how the purification's steps move with the input.
The purification the attacker differentiates is the defence's own: same RobustConfig, same seed (its timesteps and
noises do not depend on the images, so it is one fixed function: no EOT needed). Accuracies come from
`Classifier.score` with and without `robust=RobustConfig()`, as `noop-rt classify --robust` runs. The README figure
is the lowest robust accuracy over the adaptive attacks. `--quick` (4 images, 2 attack steps, 1 LM step) only proves
the script runs end to end. DIR defaults to benchmarks/results.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from noop_rt.jobs.accuracy import (
    accuracy,
    command_line,
    demo_test_set,
    model_protocol,
    noop_classifier,
    protocol_lines,
    strategy_protocol,
    targets,
)
from noop_rt.runtime.graph_specs import CLASSIFIER
from noop_rt.train.robust import AttackConfig, RobustConfig, bpda, likelihood_maximisation, margin, pgd, smooth_sign

RESULTS = Path(__file__).resolve().parent / "results"

ATTACKS = {
    "pgd": "PGD on the classifier (non-adaptive)",
    "bpda": "adaptive: BPDA (identity through the purification)",
    "full": "adaptive: full backprop through the purification (exact)",
    "full_smooth": "adaptive: full backprop, smooth-sign surrogate",
}
ADAPTIVE = ("bpda", "full", "full_smooth")


def attack_loss(kind: str, graph: torch.nn.Module, emb: torch.Tensor, y: torch.Tensor, backbone, cfg: RobustConfig
                ) -> Callable[[torch.Tensor], torch.Tensor]:
    """The differentiable loss each attack maximises over the attacked image."""
    def errors(x: torch.Tensor) -> torch.Tensor:
        return graph(x, emb)[0]

    if kind == "pgd":
        return lambda x: margin(errors(x), y)
    if kind == "bpda":
        return lambda x: margin(errors(bpda(lambda v: likelihood_maximisation(backbone, v, cfg), x)), y)
    sign = smooth_sign if kind == "full_smooth" else torch.sign
    return lambda x: margin(errors(likelihood_maximisation(backbone, x, cfg, create_graph=True, sign=sign)), y)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=100, help="held-out digits (every 360/N-th, all classes)")
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--attacks", default=",".join(ATTACKS), help=f"comma list of {', '.join(ATTACKS)}")
    parser.add_argument("--quick", action="store_true", help="smoke run: 4 images, 2 attack steps, 1 LM step")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    parser.add_argument("--work", type=Path, default=None, help="folder of finished batches, to resume an "
                        "interrupted run (default: TMPDIR/noop-rt-robust-work)")
    args = parser.parse_args()
    cfg, attack = RobustConfig(), AttackConfig()
    if args.quick:
        args.images, args.batch = 4, 4
        cfg, attack = replace(cfg, steps=1, pairs=2), replace(attack, steps=2)
    kinds = [a.strip() for a in args.attacks.split(",")]
    unknown = [a for a in kinds if a not in ATTACKS]
    if unknown:
        raise SystemExit(f"error: unknown attack(s) {', '.join(unknown)}; choose from {', '.join(ATTACKS)}")
    start = time.time()
    clf = noop_classifier()
    graph = clf.model.runner.modules[CLASSIFIER]  # the module the torch backend runs and `export` traces
    backbone = clf.model.runner.backbone  # the defence's own backbone: purify() runs on it
    emb = torch.from_numpy(clf.model.emb)  # (C, L, D) in clf.classes order
    full = demo_test_set(None)
    pick = np.linspace(0, len(full) - 1, min(args.images, len(full))).round().astype(int)
    images, names = full.images[pick], [full.names[i] for i in pick]
    y_all = targets(clf, names)
    work = args.work or Path(tempfile.gettempdir()) / f"noop-rt-robust{'-quick' if args.quick else ''}-work"
    work.mkdir(parents=True, exist_ok=True)
    counts = {"clean": [0.0, 0.0], **{k: [0.0, 0.0] for k in kinds}}  # [plain, robust] correct counts
    losses: dict[str, list[list[float]]] = {k: [] for k in kinds}
    seconds = {k: 0.0 for k in kinds}
    cpu_seconds = {k: 0.0 for k in kinds}
    resumed = []
    for i in range(0, len(images), args.batch):
        x, y = images[i:i + args.batch], y_all[i:i + args.batch]
        n = len(x)
        record = work / f"n{len(images)}-b{args.batch}-i{i}.json"
        done_batch = json.loads(record.read_text()) if record.is_file() else {}
        if done_batch:
            resumed.append(record.name)
        if "clean" not in done_batch:
            done_batch["clean"] = {"correct": [n * accuracy(clf.score(x, "noop")[0], y),
                                               n * accuracy(clf.score(x, "noop", robust=cfg)[0], y)]}
        for kind in kinds:
            if kind in done_batch:
                continue
            t0, c0 = time.perf_counter(), time.process_time()
            loss = attack_loss(kind, graph, emb, torch.from_numpy(y), backbone, cfg)
            adv, trace = pgd(loss, torch.from_numpy(x), replace(attack, seed=i))
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            assert float((adv - torch.from_numpy(x)).abs().max()) <= attack.eps + 1e-6
            adv_np = np.ascontiguousarray(adv.numpy())
            done_batch[kind] = {"correct": [n * accuracy(clf.score(adv_np, "noop")[0], y),
                                            n * accuracy(clf.score(adv_np, "noop", robust=cfg)[0], y)],
                                "trace": trace, "seconds": wall, "cpu_seconds": cpu}
            tmp = record.with_suffix(".tmp")
            tmp.write_text(json.dumps(done_batch))
            os.replace(tmp, record)
        for k in counts:
            counts[k][0] += done_batch[k]["correct"][0]
            counts[k][1] += done_batch[k]["correct"][1]
            if k != "clean":
                losses[k].append(done_batch[k]["trace"])
                seconds[k] += done_batch[k]["seconds"]
                cpu_seconds[k] += done_batch[k]["cpu_seconds"]
        done = i + n
        print(f"{done}/{len(images)}: " + ", ".join(f"{k} {a / done:.3f}/{b / done:.3f}"
                                                    for k, (a, b) in counts.items()), flush=True)
    acc = {k: {"plain": a / len(images), "robust": b / len(images)} for k, (a, b) in counts.items()}
    trace_mean = {k: np.mean(np.array(v), axis=0).tolist() for k, v in losses.items()}
    adaptive = [k for k in kinds if k in ADAPTIVE]
    worst = min(adaptive, key=lambda k: acc[k]["robust"]) if adaptive else None
    attack_rec = {"type": "L_inf PGD, random start, CW margin on the NoOp errors (robust.pgd, robust.margin)",
                  "eps_01": attack.eps / 2, "steps": attack.steps, "step_01": attack.step_size / 2,
                  "random_start": "torch.Generator().manual_seed(index of the batch's first image), uniform in the "
                                  "ball", "batch": args.batch, "target": "torch backend `classifier` graph module",
                  "kinds": {k: ATTACKS[k] for k in kinds},
                  "purification_in_the_attack": "likelihood_maximisation with the defence's RobustConfig and seed"}
    protocol = {"data": {"set": full.description + f"; {len(images)} of them: indices "
                         "numpy.linspace(0, 359, N).round()", "images": len(images)},
                "models": {"noop": model_protocol(clf, len(images))},
                "runs": {k: {"model": "noop", **strategy_protocol(clf, "noop"),
                             "attack": None if k == "clean" else ATTACKS[k]} for k in counts},
                "attack": attack_rec, "robust_config": asdict(cfg),
                "robust_timesteps": "sampled per LM step: torch.randint(int(t_low*T), int(t_high*T), (pairs,)) and "
                                    "torch.randn noises from one torch.Generator seeded with robust_config.seed"}
    out = {"images": len(images), "accuracy": acc, "worst_adaptive": worst,
           "attack_loss_mean_per_step": trace_mean,
           "attack_minutes": {k: round(s / 60, 1) for k, s in seconds.items()},
           "attack_cpu_minutes": {k: round(s / 60, 1) for k, s in cpu_seconds.items()}, "resumed_batches": resumed,
           "minutes": round((time.time() - start) / 60, 1), "protocol": protocol}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "robust.json").write_text(json.dumps(out, indent=2) + "\n")
    lines = [f"# Robust mode on the demo ({len(images)} held-out digits, NoOp single pass)", "",
             f"Produced by `{command_line('robust.py')}` (2 CPU cores, shared with other work). L_inf PGD, eps = "
             f"8/255, {attack.steps} steps of 2/255, random start, CW margin on the NoOp errors. Robust = RDC "
             f"likelihood maximisation: eta = 8/255, {cfg.steps} signed steps of 2/255, {cfg.pairs} (t, eps) draws "
             f"per step, t sampled uniformly in [{cfg.t_low:g}, {cfg.t_high:g}) x T (seeded). The adaptive attacks "
             "differentiate through the purification (the defence's own, same seed); see the script's docstring.",
             "", "| input | plain NoOp | NoOp + `--robust` |", "|---|---|---|"]
    for k in counts:
        label = "clean" if k == "clean" else ATTACKS[k]
        bold = "**" if k == worst else ""
        lines.append(f"| {label} | {100 * acc[k]['plain']:.1f} % | {bold}{100 * acc[k]['robust']:.1f} %{bold} |")
    if worst is not None:
        lines += ["", f"Robust accuracy under the strongest adaptive attack measured ({ATTACKS[worst]}): "
                      f"**{100 * acc[worst]['robust']:.1f} %** (clean with `--robust`: "
                      f"{100 * acc['clean']['robust']:.1f} %). This is the figure to quote; the non-adaptive one is "
                      "an upper bound."]
    lines += ["", "Attack margin loss per step (mean over batches; > 0 = misclassified): " + "; ".join(
        f"{k}: {v[0]:.4f} -> {v[-1]:.4f}" for k, v in trace_mean.items()) + ".",
        "Attack time, wall / CPU minutes (all threads): " + ", ".join(
            f"{k} {v} / {out['attack_cpu_minutes'][k]}" for k, v in out["attack_minutes"].items())
        + f". Wall time {out['minutes']} min."]
    lines += protocol_lines(protocol)
    (args.out / "robust.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
