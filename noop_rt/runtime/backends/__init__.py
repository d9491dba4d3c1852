"""One runner per engine (onnxruntime, OpenVINO, TensorRT, torch) behind `base.GraphRunner`; each engine is imported
only when its runner is chosen. May import: the rest of noop_rt.runtime; torch_runner alone reaches noop_rt.train."""
