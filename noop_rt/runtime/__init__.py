"""The runtime: opens a source (opener.py), runs the strategies over its graphs, returns typed results; numpy and
ONNX engines only. May import: noop_rt.demo. Never torch, except the torch backend's one lazy door to noop_rt.train."""
