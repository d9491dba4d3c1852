"""The streaming weights file export writes (`build/shared_weights.py`), and onnxruntime's "mapped" weights: graphs
whose exporter stored their tensors in files of their own (what the TorchScript exporter does past 2 GB, the path
every Stable Diffusion UNet graph takes) are re-homed tensor by tensor into one deduplicated weights.bin."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from noop_rt.build.shared_weights import PAGE_ALIGN, WeightsFile
from noop_rt.runtime.backends.onnxruntime_runner import OnnxRuntimeRunner
from noop_rt.runtime.bundle import Bundle

DEMO_BUNDLE = Path(__file__).resolve().parent.parent / "noop_rt" / "demo" / "bundle"


def _matmul_graph(name: str, weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    """x (1, 512) -> x @ w1 @ w2 ... (the initializers in order)."""
    nodes, last = [], "x"
    for i, key in enumerate(weights):
        nodes.append(helper.make_node("MatMul", [last, key], [f"y{i}"]))
        last = f"y{i}"
    graph = helper.make_graph(nodes, name, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 512])],
                              [helper.make_tensor_value_info(last, TensorProto.FLOAT, [1, 512])],
                              [numpy_helper.from_array(w, k) for k, w in weights.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _exported_with_own_files(model: onnx.ModelProto, folder: Path) -> tuple[onnx.ModelProto, Path]:
    """Save `model` as the exporter does past 2 GB (one external file per tensor) and read it back without its
    weights, as export does."""
    folder.mkdir()
    path = folder / "graph.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=False,
                    size_threshold=0)
    return onnx.load(str(path), load_external_data=False), folder


def test_graphs_with_their_own_external_files_are_streamed_into_one_deduplicated_file(tmp_path) -> None:
    rng = np.random.default_rng(0)
    shared = rng.standard_normal((512, 512)).astype(np.float32)  # 1 MiB: page-aligned in weights.bin
    own_a, own_b = (rng.standard_normal((512, 512)).astype(np.float32) for _ in range(2))
    a, a_dir = _exported_with_own_files(_matmul_graph("a", {"w_shared": shared, "w_a": own_a}), tmp_path / "a")
    b, b_dir = _exported_with_own_files(_matmul_graph("b", {"unet.w": shared, "w_b": own_b}), tmp_path / "b")
    assert len(list(a_dir.iterdir())) == 3  # the graph and one file per tensor
    out = tmp_path / "bundle"
    out.mkdir()
    weights = WeightsFile(out)
    for model, base, file in ((a, a_dir, "a.onnx"), (b, b_dir, "b.onnx")):
        weights.save(weights.add(model, base), file)
        assert [p.name for p in base.iterdir()] == ["graph.onnx"]  # the exporter's tensor files were consumed
    summary = weights.close(["a", "b"])
    assert summary["unique_tensor_bytes"] == 3 * shared.nbytes  # the shared tensor once
    assert summary["referenced_tensor_bytes"] == 4 * shared.nbytes
    assert (out / "weights.bin").stat().st_size == summary["bytes"] < 4 * shared.nbytes
    offsets = {}
    for file in ("a.onnx", "b.onnx"):
        for t in onnx.load(str(out / file), load_external_data=False).graph.initializer:
            info = {e.key: e.value for e in t.external_data}
            assert info["location"] == "weights.bin" and int(info["offset"]) % PAGE_ALIGN == 0
            offsets[(file, t.name)] = int(info["offset"])
    assert offsets[("a.onnx", "w_shared")] == offsets[("b.onnx", "unet.w")]
    x = rng.standard_normal((1, 512)).astype(np.float32)
    for file, second in (("a.onnx", own_a), ("b.onnx", own_b)):
        session = ort.InferenceSession(str(out / file), providers=["CPUExecutionProvider"])
        got = session.run(None, {"x": x})[0]
        np.testing.assert_allclose(got, x @ shared @ second, rtol=1e-4, atol=1e-3)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the process's mappings from /proc")
def test_mapped_weights_stay_in_the_memory_mapped_file_and_score_the_same() -> None:
    """NOOP_RT_ORT_WEIGHTS=mapped: the classifier's weights are used in place from weights.bin (the file stays
    mapped), where the default repacks them into heap copies and unmaps the file; the errors agree."""
    bundle = Bundle.open(DEMO_BUNDLE)
    image = np.random.default_rng(0).uniform(-1, 1, (2, 3, 16, 16)).astype(np.float32)
    mapped_bytes, errors = {}, {}
    for mode in ("packed", "mapped"):
        runner = OnnxRuntimeRunner(bundle, "cpu", weights=mode)
        errors[mode] = runner.run("classifier", {"image": image}, ["errors"])[0]
        mapped_bytes[mode] = _mapped(DEMO_BUNDLE / "weights.bin")
        runner.close()
        del runner
    external = sum(map(int, _external_lengths(DEMO_BUNDLE / "classifier.onnx")))
    assert mapped_bytes["mapped"] >= 0.9 * external
    assert mapped_bytes["packed"] < 0.2 * external
    np.testing.assert_allclose(errors["mapped"], errors["packed"], rtol=1e-5, atol=1e-6)


def _external_lengths(graph: Path) -> list[str]:
    model = onnx.load(str(graph), load_external_data=False)
    return [{e.key: e.value for e in t.external_data}["length"] for t in model.graph.initializer
            if t.data_location == TensorProto.EXTERNAL]


def _mapped(file: Path) -> int:
    """Bytes of `file` mapped into this process now."""
    total = 0
    for line in Path("/proc/self/maps").read_text().splitlines():
        if line.endswith(str(file.resolve())):
            start, end = (int(x, 16) for x in line.split()[0].split("-"))
            total += end - start
    return total
