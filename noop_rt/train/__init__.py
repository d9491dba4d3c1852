"""The torch side: backbones, the diffusion-error modules (trained, run by the torch backend, exported), NoOp
training, checkpoints, robust mode, calibration. May import: noop_rt.runtime, noop_rt.demo."""
