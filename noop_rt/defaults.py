"""Few-shot split sizes shared by `noop-rt train`, `noop-rt demo-data` and the benchmarks (no heavy imports).

30 validation images per class: with 10, the demo's validation split was classified perfectly by most epochs, so model
selection picked an early epoch by tie and tau came from the calibration prior; 3 training seeds measured 98.5 ± 0.4 %
held-out with 10 and 98.8 ± 0.8 % with 30 (benchmarks/results/noop_seeds_t300*.md).
"""

SHOTS = 16
VAL_SHOTS = 30
