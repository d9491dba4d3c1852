"""The built-in demo: a text-conditioned pixel diffusion model trained on scikit-learn's handwritten digits."""

from pathlib import Path

DEMO_DIR = Path(__file__).resolve().parent
MODEL_DIR = DEMO_DIR / "model"  # diffusers/transformers save_pretrained layout
CKPT_PATH = DEMO_DIR / "digits.pt"  # NoOp checkpoint trained on the demo's few-shot split
BUNDLE_DIR = DEMO_DIR / "bundle"  # pre-exported ONNX bundle of that checkpoint
EXAMPLES_DIR = DEMO_DIR / "examples"  # one held-out image per class

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DEMO_TEMPLATE = "a handwritten digit {}"


def model_name(checkpoint: Path) -> str:
    """A model's name: the checkpoint's stem, and `digits` for the shipped demo checkpoint."""
    try:
        return "digits" if checkpoint.resolve() == CKPT_PATH.resolve() else checkpoint.stem
    except OSError:
        return checkpoint.stem
