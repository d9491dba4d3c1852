"""The GPU fast paths: per-shape caches, onnxruntime IO binding, CUDA graphs (torch, onnxruntime, TensorRT).

What runs on the CPU is tested here for real: the cache policy, the onnxruntime IO-binding code (the same `Bound`
class binds CPU OrtValues, compared with plain `session.run` on the demo bundle), the torch `CudaGraphed` cache and
static-buffer protocol (through `static_eager`), TensorRT's graph-cache policy. The CUDA captures themselves are only
exercised by the tests marked "needs an NVIDIA GPU", which skip here.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import noop_rt
from noop_rt.demo import CKPT_PATH, DEMO_DIR
from noop_rt.runtime.backends import onnxruntime_runner as ortb
from noop_rt.runtime.backends import tensorrt_cuda_graph as trt_cuda_graph
from noop_rt.runtime.backends import tensorrt_runner as trtb
from noop_rt.runtime.backends.base import GraphRunner, env_flag
from noop_rt.runtime.backends.shape_cache import ShapeCache, host_array, signature
from noop_rt.runtime.backends.torch_cuda_graph import CudaGraphed, static_eager
from noop_rt.runtime.bundle import Bundle
from noop_rt.runtime.errors import BadInputError
from noop_rt.runtime.graph_specs import CLASSES, CLASSIFIER, ENCODER, NOISE, SCORER, TEXT_ENCODER

NO_GPU = "needs an NVIDIA GPU (not run here)"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_GPU)


@pytest.fixture(scope="module")
def bundle() -> Bundle:
    return Bundle.open(DEMO_DIR / "bundle")


def images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (n, 3, 16, 16)).astype(np.float32)


# ----------------------------------------------------------------------------------------------- the cache policy
def test_shape_cache_evicts_least_recently_used_and_releases() -> None:
    closed: list[str] = []
    cache: ShapeCache[str] = ShapeCache(2, evict=True, close=closed.append)
    assert cache.try_add("a", lambda: "A") == "A" and cache.try_add("b", lambda: "B") == "B"
    assert cache.lookup("a") == "A"  # a is now the most recently used: b goes first
    assert cache.try_add("c", lambda: "C") == "C"
    assert list(cache.entries) == ["a", "c"] and closed == ["B"] and cache.built == 3
    assert cache.get("a", lambda: "never") == "A"
    cache.clear()
    assert len(cache) == 0 and sorted(closed) == ["A", "B", "C"]


def test_shape_cache_without_eviction_keeps_the_first_and_remembers_failures() -> None:
    cache: ShapeCache[int] = ShapeCache(2, evict=False)
    builds = []

    def build(value: int) -> int:
        builds.append(value)
        if value < 0:
            raise RuntimeError("capture not permitted\nmore detail")
        return value

    assert cache.try_add((1,), lambda: build(1)) == 1
    assert cache.try_add((2,), lambda: build(-2)) is None  # failed: remembered, not cached, slot still free
    assert cache.failures == {(2,): "RuntimeError: capture not permitted"}
    assert cache.try_add((2,), lambda: build(2)) is None and not cache.has_room((2,))  # never retried
    assert cache.try_add((3,), lambda: build(3)) == 3
    assert cache.try_add((4,), lambda: build(4)) is None and len(cache) == 2  # full: the plain path
    assert builds == [1, -2, 3] and cache.lookup((1,)) == 1
    assert ShapeCache(0, evict=True).try_add("x", lambda: 1) is None
    with pytest.raises(ValueError):
        ShapeCache(-1, evict=True)


def test_signature_and_host_array() -> None:
    a, b = np.zeros((2, 3), np.float32), np.zeros(4, np.int64)
    assert signature({"x": a, "y": b}) == signature({"y": b, "x": a}) == (("x", (2, 3), "float32"),
                                                                           ("y", (4,), "int64"))
    assert signature({"x": a}) != signature({"x": a.astype(np.float16)}) != signature({"x": a[:1]})
    assert signature({"x": torch.zeros(2, 3)}) == (("x", (2, 3), "torch.float32"),)
    kept = host_array(a, on_host_buffer=True)
    a[0, 0] = 7
    assert kept[0, 0] == 0 and host_array(a, on_host_buffer=False) is a


@pytest.mark.parametrize(("value", "want"), [("", True), ("1", True), ("yes", True), ("0", False), ("off", False),
                                             (" False ", False)])
def test_env_flag(monkeypatch, value: str, want: bool) -> None:
    monkeypatch.setenv("NOOP_RT_TEST_FLAG", value)
    assert env_flag("NOOP_RT_TEST_FLAG", True) is want
    monkeypatch.setenv("NOOP_RT_TEST_FLAG", "maybe")
    with pytest.raises(BadInputError, match="NOOP_RT_TEST_FLAG"):
        env_flag("NOOP_RT_TEST_FLAG", True)


# ----------------------------------------------------------------------------------------------- onnxruntime
def test_output_shapes_from_the_spec(bundle) -> None:
    specs = bundle.graphs
    x = images(3, 0)
    assert ortb.output_shapes(specs[CLASSIFIER], {"image": x}, ["errors", "probs"], {CLASSES: 10}) == {
        "errors": (3, 10), "probs": (3, 10)}
    emb = np.zeros((4, 8, 64), np.float32)  # fed class embeddings size the classes axis
    z = np.zeros((5, 1, 16, 16), np.float32)
    feeds = {"z0": z, "eps": z, "timestep": np.zeros(5, np.float32), "class_embeddings": emb}
    assert ortb.output_shapes(specs[SCORER], feeds, ["errors_l1"], {}) == {"errors_l1": (5, 4)}
    assert ortb.output_shapes(specs[TEXT_ENCODER], {"input_ids": np.zeros((6, 8), np.int64)},
                              ["last_hidden_state"], {}) == {"last_hidden_state": (6, 8, 64)}
    with pytest.raises(KeyError):  # nothing sizes the classes axis
        ortb.output_shapes(specs[CLASSIFIER], {"image": x}, ["errors"], {})
    with pytest.raises(KeyError):
        ortb.output_shapes(specs[CLASSIFIER], {"image": x}, ["logits"], {CLASSES: 10})


def test_providers_ask_for_cuda_graphs_only_on_cuda() -> None:
    assert ortb.providers("cuda:1", cuda_graph=True)[0] == ("CUDAExecutionProvider",
                                                            {"device_id": 1, "enable_cuda_graph": "1"})
    assert ortb.providers("cuda:1")[0] == ("CUDAExecutionProvider", {"device_id": 1})
    assert ortb.providers("cpu", cuda_graph=True) == ["CPUExecutionProvider"]


def test_io_binding_is_selected_by_flag_or_environment(bundle, monkeypatch) -> None:
    monkeypatch.delenv(ortb.IOBINDING_ENV, raising=False)
    assert not ortb.OnnxRuntimeRunner(bundle, "cpu").io_binding  # CPU default: plain session.run
    monkeypatch.setenv(ortb.IOBINDING_ENV, "1")
    assert ortb.OnnxRuntimeRunner(bundle, "cpu").io_binding
    assert not ortb.OnnxRuntimeRunner(bundle, "cpu", io_binding=False).io_binding
    monkeypatch.setenv(ortb.CUDA_GRAPH_ENV, "1")
    assert not ortb.OnnxRuntimeRunner(bundle, "cpu").cuda_graph  # CUDA graphs: CUDA only


def test_io_binding_matches_session_run_on_every_graph(bundle) -> None:
    plain = ortb.OnnxRuntimeRunner(bundle, "cpu", threads=1)
    bound = ortb.OnnxRuntimeRunner(bundle, "cpu", threads=1, io_binding=True)
    rng = np.random.default_rng(1)
    emb = bundle.class_embeddings()
    z = rng.standard_normal((4, 1, 16, 16)).astype(np.float32)
    eps = rng.standard_normal((4, 1, 16, 16)).astype(np.float32)
    calls = [
        (CLASSIFIER, {"image": images(3, 1)}, ["errors", "probs"]),
        (SCORER, {"z0": z, "eps": eps, "timestep": np.full(4, 300, np.float32), "class_embeddings": emb[:5]},
         ["errors_l2", "errors_l1", "errors_huber"]),
        (ENCODER, {"image": images(2, 3)}, ["z0"]),
        (NOISE, {"z0": z}, ["eps"]),
        (TEXT_ENCODER, {"input_ids": bundle.tokenize(["a handwritten digit four", "a handwritten digit nine"])},
         ["last_hidden_state"]),
    ]
    for graph, feeds, outputs in calls:
        want = plain.run(graph, feeds, outputs)
        got = bound.run(graph, feeds, outputs)
        assert [g.shape for g in got] == [w.shape for w in want], graph
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6, err_msg=graph)
    assert bound.bindings.failures == {} and len(bound.bindings) == len(calls)  # every call went through a binding
    assert all(b.calls == 1 for b in bound.bindings.entries.values())


def test_io_binding_copies_new_inputs_in_and_keeps_old_outputs(bundle) -> None:
    plain = ortb.OnnxRuntimeRunner(bundle, "cpu", threads=1)
    bound = ortb.OnnxRuntimeRunner(bundle, "cpu", threads=1, io_binding=True)
    first_in, second_in = images(4, 10), images(4, 11)
    first = bound.run(CLASSIFIER, {"image": first_in}, ["errors"])[0]
    kept = first.copy()
    second = bound.run(CLASSIFIER, {"image": second_in}, ["errors"])[0]  # same shape: the same binding, new data
    assert len(bound.bindings) == 1 and next(iter(bound.bindings.entries.values())).calls == 2
    np.testing.assert_allclose(second, plain.run(CLASSIFIER, {"image": second_in}, ["errors"])[0], rtol=1e-6)
    assert not np.allclose(first, second)
    np.testing.assert_array_equal(first, kept)  # the first result is not a view of the reused buffer
    first_in[:] = 0  # the caller's array is copied in, not bound: changing it afterwards changes nothing
    again = bound.run(CLASSIFIER, {"image": second_in}, ["errors"])[0]
    np.testing.assert_array_equal(again, second)


def test_io_bindings_are_kept_per_shape_and_evicted(bundle) -> None:
    plain = ortb.OnnxRuntimeRunner(bundle, "cpu", threads=1)
    bound = ortb.OnnxRuntimeRunner(bundle, "cpu", threads=1, io_binding=True)
    sizes = [*range(1, ortb.MAX_BINDINGS + 3), 1, 2]
    for i, n in enumerate(sizes):
        x = images(n, 100 + i)
        np.testing.assert_allclose(bound.run(CLASSIFIER, {"image": x}, ["probs"])[0],
                                   plain.run(CLASSIFIER, {"image": x}, ["probs"])[0], rtol=1e-6, atol=1e-7)
    assert len(bound.bindings) == ortb.MAX_BINDINGS and bound.bindings.built == len(sizes)  # 1 and 2 were evicted
    bound.close()
    assert len(bound.bindings) == 0 and bound.sessions == {}


def test_classifier_with_io_binding_gives_the_same_results(monkeypatch) -> None:
    example = str(DEMO_DIR / "examples" / "seven.png")
    plain = noop_rt.load(backend="onnxruntime", device="cpu", threads=1)
    monkeypatch.setenv(ortb.IOBINDING_ENV, "1")
    bound = noop_rt.load(backend="onnxruntime", device="cpu", threads=1)
    assert bound.model.runner.io_binding and not plain.model.runner.io_binding
    for method in ("noop", "baseline"):
        a = plain.classify([example, example], method=method, top_k=3, pairs=2)
        b = bound.classify([example, example], method=method, top_k=3, pairs=2)
        assert [r.label for r in a] == [r.label for r in b] == ["seven", "seven"]
        for x, y in zip(a, b, strict=True):
            assert [t.error for t in x.top] == pytest.approx([t.error for t in y.top], rel=1e-5)
    assert len(bound.model.runner.bindings) >= 2  # the classifier graph, then encoder + scorer


# ----------------------------------------------------------------------------------------------- torch CUDA graphs
class Affine(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.conv(x) * scale.view(-1, 1, 1, 1)
        return y.mean(dim=(2, 3)), y.amax(dim=(2, 3))


@torch.no_grad()
def test_cuda_graphed_static_buffers_per_shape() -> None:
    module = Affine().eval()
    graphed = CudaGraphed(module, capture=static_eager, max_graphs=2)
    first = None
    for i, n in enumerate([2, 3, 2, 5, 3, 2]):  # 2 and 3 captured, 5 over the limit: eager
        x, s = torch.randn(n, 3, 8, 8), torch.rand(n) + 0.5
        got, want = graphed(x, s), module(x, s)
        assert len(got) == 2
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w)
        if i == 0:
            first = (got[0].clone(), got[0])
    assert first is not None and torch.equal(first[0], first[1])  # later replays did not overwrite a result
    assert len(graphed.graphs) == 2 and graphed.replays == 5 and graphed.eager_calls == 1


def test_cuda_graphed_falls_back_to_eager() -> None:
    module = Affine().eval()
    x, s = torch.randn(2, 3, 8, 8), torch.ones(2)
    plain = CudaGraphed(module)  # the CUDA capture: never on CPU tensors
    torch.testing.assert_close(plain(x, s), module(x, s))
    assert plain.eager_calls == 1 and len(plain.graphs) == 0 and plain.graphs.failures == {}
    captures = []

    def broken(mod, static):
        captures.append(len(static))
        raise RuntimeError("operation not permitted when stream is capturing")

    failing = CudaGraphed(module, capture=broken)
    for _ in range(3):
        torch.testing.assert_close(failing(x, s), module(x, s))
    assert captures == [2] and failing.eager_calls == 3 and "not permitted" in next(iter(
        failing.graphs.failures.values()))
    off = CudaGraphed(module, capture=static_eager, enabled=False)
    off(x, s)
    assert off.eager_calls == 1 and len(off.graphs) == 0


@pytest.fixture(scope="module")
def demo_ckpt():
    from noop_rt.runtime.backends.torch_runner import open_checkpoint

    return open_checkpoint(CKPT_PATH, None, "cpu", False, 40)


@torch.no_grad()
def test_torch_runner_classifier_through_static_buffers(demo_ckpt, monkeypatch) -> None:
    from noop_rt.runtime.backends.torch_runner import CUDA_GRAPH_ENV, TorchRunner

    eager, _, _ = demo_ckpt
    monkeypatch.setenv(CUDA_GRAPH_ENV, "1")
    assert TorchRunner(eager.backbone, eager.ckpt).graphed is None  # CPU: no CUDA graphs, whatever the switch
    runner = TorchRunner(eager.backbone, eager.ckpt, capture=static_eager)
    assert runner.graphed is not None
    emb = eager.ckpt.class_embeddings.float().numpy()
    for i, (n, feeds) in enumerate(((3, {}), (1, {}), (3, {}), (2, {"class_embeddings": emb[[0, 4]]}))):
        x = images(n, 20 + i)  # new data each call: a replay on stale static inputs would show
        got = runner.run(CLASSIFIER, {"image": x, **feeds}, ["errors", "probs"])
        want = eager.run(CLASSIFIER, {"image": x, **feeds}, ["errors", "probs"])
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
    assert runner.graphed.replays == 3 and runner.graphed.eager_calls == 1  # 2 shapes captured, the 3rd eager
    runner.close()
    assert runner.graphed is None


# ----------------------------------------------------------------------------------------------- TensorRT policy
class FakeBuffer:
    def __init__(self, ptr: int) -> None:
        self.ptr = ptr


def test_tensorrt_graph_cache_drops_graphs_when_a_buffer_moves() -> None:
    freed: list[str] = []
    cache: trt_cuda_graph.GraphCache[str] = trt_cuda_graph.GraphCache(2, freed.append)
    at = trt_cuda_graph.buffer_addresses({"probs": FakeBuffer(300), "image": FakeBuffer(100),
                                          "errors": FakeBuffer(200)})
    assert at == (("errors", 200), ("image", 100), ("probs", 300))
    small, large = signature({"image": np.zeros((1, 3, 16, 16), np.float32)}), signature(
        {"image": np.zeros((4, 3, 16, 16), np.float32)})
    assert cache.lookup(small, at) is None and cache.try_add(small, lambda: "g-small") == "g-small"
    assert cache.lookup(small, at) == "g-small"
    moved = trt_cuda_graph.buffer_addresses({"image": FakeBuffer(900), "errors": FakeBuffer(200),
                                             "probs": FakeBuffer(300)})
    assert cache.lookup(large, moved) is None and freed == ["g-small"]  # captured on the old address: gone
    cache.try_add(large, lambda: "g-large")
    assert cache.lookup(small, moved) is None and cache.lookup(large, moved) == "g-large"

    def fails() -> str:
        raise trtb.EngineError("CUDA runtime call cudaStreamBeginCapture failed with error 900")

    assert cache.try_add(small, fails) is None and "error 900" in (cache.failure(small) or "")
    cache.clear()
    assert freed == ["g-small", "g-large"]


# ----------------------------------------------------------------------------------------------- on a GPU only
@needs_cuda
@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_graph_capture_matches_eager(dtype) -> None:  # pragma: no cover - needs a GPU
    module = Affine().to("cuda", dtype).eval()
    graphed = CudaGraphed(module)
    for n in (2, 3, 2, 3):
        x, s = torch.randn(n, 3, 8, 8, device="cuda", dtype=dtype), torch.rand(n, device="cuda", dtype=dtype)
        for g, w in zip(graphed(x, s), module(x, s), strict=True):
            torch.testing.assert_close(g, w)
    assert graphed.graphs.failures == {} and len(graphed.graphs) == 2 and graphed.replays == 4


@needs_cuda
@torch.no_grad()
@pytest.mark.parametrize("fp16", [False, True])
def test_torch_runner_cuda_graphs_match_eager_on_the_demo(fp16: bool) -> None:  # pragma: no cover - needs a GPU
    from noop_rt.runtime.backends.torch_runner import TorchRunner, open_checkpoint

    eager, _, _ = open_checkpoint(CKPT_PATH, None, "cuda", fp16, 40)
    graphed = TorchRunner(eager.backbone, eager.ckpt, fp16, cuda_graph=True)  # the same networks, graphed
    assert eager.graphed is None and graphed.graphed is not None
    for i, n in enumerate((4, 1, 4)):
        x = images(n, 30 + i)
        got = graphed.run(CLASSIFIER, {"image": x}, ["errors"])[0]
        want = eager.run(CLASSIFIER, {"image": x}, ["errors"])[0]
        np.testing.assert_allclose(got, want, rtol=1e-2 if fp16 else 1e-4, atol=1e-3 if fp16 else 1e-5)
    assert graphed.graphed.graphs.failures == {} and graphed.graphed.replays == 3


def ort_cuda_reason() -> str | None:
    return ortb.cuda_unavailable()


@pytest.mark.skipif(ort_cuda_reason() is not None, reason=f"{NO_GPU}: onnxruntime-gpu with a CUDA provider")
def test_onnxruntime_cuda_binding_and_graphs_match_the_cpu(bundle) -> None:  # pragma: no cover - needs a GPU
    cpu = ortb.OnnxRuntimeRunner(bundle, "cpu")
    bound = ortb.OnnxRuntimeRunner(bundle, "cuda:0")  # IO binding: the CUDA default
    graphs = ortb.OnnxRuntimeRunner(bundle, "cuda:0", cuda_graph=True)
    assert bound.io_binding and not bound.cuda_graph and graphs.cuda_graph
    for i, n in enumerate((4, 1, 4, 1)):
        x = images(n, 40 + i)
        want = cpu.run(CLASSIFIER, {"image": x}, ["errors", "probs"])
        for runner in (bound, graphs):
            got = runner.run(CLASSIFIER, {"image": x}, ["errors", "probs"])
            for g, w in zip(got, want, strict=True):
                np.testing.assert_allclose(g, w, rtol=1e-3, atol=1e-4)
    assert len(bound.bindings) == 2 and bound.bindings.failures == {}
    assert len(graphs.captured) == 2, graphs.notes  # one CUDA-graph session per shape
    assert all(b.calls == 2 for b in graphs.captured.entries.values())


def test_synchronize_is_once_per_timed_score_never_per_graph_call() -> None:
    """Classifier.score synchronizes the runner (a wait on torch and TensorRT) once, to time the model stage;
    onnxruntime keeps the contract's no-op (its outputs are host arrays when `run` returns), and no graph call syncs."""
    assert ortb.OnnxRuntimeRunner.synchronize is GraphRunner.synchronize
    clf = noop_rt.load(backend="onnxruntime", device="cpu", threads=1)
    runner = clf.model.runner
    counts = {"sync": 0, "run": 0}
    run = runner.run

    def counted_run(*args, **kwargs):
        counts["run"] += 1
        return run(*args, **kwargs)

    def synchronize() -> None:
        counts["sync"] += 1

    runner.run, runner.synchronize = counted_run, synchronize
    example = str(DEMO_DIR / "examples" / "seven.png")
    clf.classify([example] * 3, method="baseline", pairs=3)  # one image per score call, several graph calls each
    assert counts["sync"] == 3 and counts["run"] > counts["sync"]
