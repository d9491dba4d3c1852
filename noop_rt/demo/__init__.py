"""The built-in demo: a text-conditioned pixel diffusion model trained on scikit-learn's handwritten digits."""

from pathlib import Path

DEMO_DIR = Path(__file__).resolve().parent
MODEL_DIR = DEMO_DIR / "model"  # diffusers/transformers save_pretrained layout
CKPT_PATH = DEMO_DIR / "digits.pt"  # NoOp checkpoint trained on the demo's few-shot split
BUNDLE_DIR = DEMO_DIR / "bundle"  # pre-exported ONNX bundle of that checkpoint
EXAMPLES_DIR = DEMO_DIR / "examples"  # one held-out image per class

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DEMO_TEMPLATE = "a handwritten digit {}"

# Few-shot split sizes: the demo's NoOp split, and the defaults of `noop-rt train` and `noop-rt demo-data`.
# 30 validation images per class: with 10 (100 on the demo) one validation error moves model selection's accuracy by a
# point, and the demo checkpoint's best epoch classified all 100 correctly, so its tau came from the calibration prior
# alone. With 30, the demo's NoOp measured 98.8 ± 0.8 % held-out over 3 training seeds against 98.5 ± 0.4 % with 10
# (benchmarks/results/noop_seeds_t300_val30.md, noop_seeds_t300.md), and its tau is fitted on validation errors.
SHOTS = 16
VAL_SHOTS = 30


def model_name(checkpoint: Path) -> str:
    """A model's name: the checkpoint's stem, and `digits` for the shipped demo checkpoint."""
    try:
        return "digits" if checkpoint.resolve() == CKPT_PATH.resolve() else checkpoint.stem
    except OSError:
        return checkpoint.stem
