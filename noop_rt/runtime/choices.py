"""The names a user chooses from, each list once and importing nothing (the CLI checks them before numpy loads)."""

ENGINES = ("tensorrt", "onnxruntime", "openvino", "torch")  # the runners, in `auto`'s order of preference
BACKENDS = ("auto", *ENGINES)
METHODS = ("noop", "baseline", "adaptive", "pruned", "cascade")  # the strategies (runtime/strategies.py registers them)
ESCALATIONS = ("pruned", "adaptive", "baseline")  # what `cascade` may send the images NoOp is unsure of to
LOSSES = ("l2", "l1", "huber")  # the error norms every scorer graph outputs
SOURCE_KINDS = ("bundle", "checkpoint", "diffusers")  # what `load(kind=...)` may insist a source is
