"""Few-shot split sizes shared by `noop-rt train`, `noop-rt demo-data` and the benchmarks (no heavy imports).

30 validation images per class: with 10 (100 on the demo) one validation error moves model selection's accuracy by a
point, and the demo checkpoint's best epoch classified all 100 correctly, so its tau came from the calibration prior
alone. With 30, the demo's NoOp measured 98.8 ± 0.8 % held-out over 3 training seeds against 98.5 ± 0.4 % with 10
(benchmarks/results/noop_seeds_t300_val30.md, noop_seeds_t300.md), and its tau is fitted on validation errors.
"""

SHOTS = 16
VAL_SHOTS = 30
