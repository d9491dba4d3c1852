"""ONNX export: the graphs, parity with torch, dynamic axes, weights stored once, the bundle contract and its
errors, atomicity."""

from __future__ import annotations

import importlib.util
import io
import json
import pathlib
import shutil
import socket
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from typer.testing import CliRunner

from noop_rt.build.export import ExportOptions, collect_images, export_bundle
from noop_rt.cli import app
from noop_rt.runtime.backends.onnxruntime_runner import OnnxRuntimeRunner
from noop_rt.runtime.bundle import Bundle
from noop_rt.runtime.errors import BadInputError
from noop_rt.train.backbones import load_backbone
from noop_rt.train.checkpoint import load_checkpoint

runner = CliRunner()
GRAPHS = ("classifier", "scorer", "vae_encoder", "noise", "text_encoder")


def test_bundle_layout_manifest_and_validation(tiny_bundle) -> None:
    names = {p.name for p in tiny_bundle.iterdir()}
    assert {"manifest.json", "validation.json", "weights.bin", "class_embeddings.npy", "tokenizer",
            *(f"{g}.onnx" for g in GRAPHS)} <= names
    for graph in GRAPHS:
        onnx.checker.check_model(str(tiny_bundle / f"{graph}.onnx"))
        assert onnx.load(str(tiny_bundle / f"{graph}.onnx"), load_external_data=False).opset_import[0].version >= 17
    m = json.loads((tiny_bundle / "manifest.json").read_text())
    assert m["version"] == 2 and m["name"] == "tiny"
    assert m["classes"] == ["blue circle", "red square"] and m["t_star"] == 500 and m["precision"] == "fp32"
    assert m["max_batch"] == 3 * 2 and m["resolution"] == 32 and m["latent_shape"] == [4, 16, 16]
    assert m["classifier_graph"] == {"file": "classifier.onnx", "input": "image", "errors": "errors",
                                     "probs": "probs", "note": m["classifier_graph"]["note"]}
    # the trained classes' embeddings are constants of the classifier graph: `image` is its one input
    classifier = onnx.load(str(tiny_bundle / "classifier.onnx"), load_external_data=False)
    assert [i.name for i in classifier.graph.input] == ["image"]
    assert [t["name"] for t in m["graphs"]["classifier"]["inputs"]] == ["image"]
    assert m["preprocessing"]["resolution"] == 32 and m["preprocessing"]["range"] == [-1.0, 1.0]
    assert set(m["files"]) >= {"classifier.onnx", "weights.bin", "class_embeddings.npy", "validation.json",
                               "tokenizer/tokenizer.json"}
    v = json.loads((tiny_bundle / "validation.json").read_text())
    assert set(v["graphs"]) == {"classifier", "scorer:errors_l2", "scorer:errors_l1", "scorer:errors_huber",
                                "vae_encoder", "noise", "text_encoder"}  # every graph was compared with torch


def test_unet_weights_are_stored_once(tiny_bundle, tiny_ckpt) -> None:
    """The classifier and scorer graphs both hold the UNet; its tensors live once in weights.bin, at the same
    offsets for both graphs."""
    def external(graph: str) -> dict[tuple[str, str], int]:
        model = onnx.load(str(tiny_bundle / f"{graph}.onnx"), load_external_data=False)
        out = {}
        for t in model.graph.initializer:
            if t.data_location == onnx.TensorProto.EXTERNAL:
                info = {e.key: e.value for e in t.external_data}
                assert info["location"] == "weights.bin"
                out[(info["offset"], info["length"])] = int(info["length"])
        return out

    classifier, scorer = external("classifier"), external("scorer")
    shared = set(classifier) & set(scorer)
    unet = load_backbone(load_checkpoint(tiny_ckpt).backbone_source).unet
    unet_bytes = sum(p.numel() * 4 for p in unet.parameters())
    assert sum(classifier[k] for k in shared) >= 0.9 * unet_bytes  # (constant folding may fuse a few tensors)
    referenced = sum(sum(external(g).values()) for g in GRAPHS)
    size = (tiny_bundle / "weights.bin").stat().st_size
    assert size < referenced - 0.9 * unet_bytes  # the second copy of the UNet is not on disk


def test_graphs_have_dynamic_axes(tiny_bundle, tiny_ckpt) -> None:
    """The scorer runs any number of rows, classes and mixed timesteps (traced at 2 rows x 3 classes)."""
    bundle = Bundle.open(tiny_bundle)
    ort = OnnxRuntimeRunner(bundle, "cpu")
    ckpt = load_checkpoint(tiny_ckpt)
    bb = load_backbone(ckpt.backbone_source)
    module = bb.class_errors(("l2", "l1", "huber"))
    gen = torch.Generator().manual_seed(0)
    for rows, k in ((1, 1), (5, 2), (7, 4)):
        z0, eps = torch.randn(rows, 4, 16, 16, generator=gen), torch.randn(rows, 4, 16, 16, generator=gen)
        t = torch.randint(0, 1000, (rows,), generator=gen).float()
        emb = ckpt.class_embeddings[torch.arange(k) % 2] + 0.01 * torch.arange(k).view(-1, 1, 1)
        with torch.no_grad():
            want = module(z0, eps, t, emb)
        got = ort.run("scorer", {"z0": z0.numpy(), "eps": eps.numpy(), "timestep": t.numpy(),
                                 "class_embeddings": emb.numpy()}, ["errors_l2", "errors_l1", "errors_huber"])
        for g, w in zip(got, want, strict=True):
            assert g.shape == (rows, k)
            np.testing.assert_allclose(g, w.numpy(), rtol=1e-4, atol=1e-6)
    images = np.random.default_rng(0).uniform(-1, 1, (3, 3, 32, 32)).astype(np.float32)
    errors, probs = ort.run("classifier", {"image": images}, ["errors", "probs"])
    assert errors.shape == probs.shape == (3, 2)


def test_classifier_graph_runs_in_a_bare_onnxruntime_session(tiny_bundle, shape_images) -> None:
    """Any ONNX runtime serves the classifier from its file alone: a bare InferenceSession, no noop_rt import,
    feeding `image` only, agrees with `noop-rt classify` on the bundle."""
    imgs = sorted(shape_images.rglob("*.png"))
    code = (
        "import sys, json, numpy as np, onnxruntime as ort\n"
        "from PIL import Image\n"
        "m = json.load(open(sys.argv[1] + '/manifest.json'))\n"
        "r = m['preprocessing']['resolution']\n"
        "def load(p):\n"
        "    img = Image.open(p).convert('RGB')\n"
        "    w, h = img.size\n"
        "    s = r / min(w, h)\n"
        "    img = img.resize((max(r, int(w * s)), max(r, int(h * s))), Image.BICUBIC)\n"
        "    left, top = round((img.width - r) / 2), round((img.height - r) / 2)\n"
        "    img = img.crop((left, top, left + r, top + r))\n"
        "    return (np.asarray(img, np.float32) / 127.5 - 1).transpose(2, 0, 1)\n"
        "sess = ort.InferenceSession(sys.argv[1] + '/' + m['classifier_graph']['file'])\n"
        "x = np.stack([load(p) for p in sys.argv[2:]])\n"
        "errors, probs = sess.run([m['classifier_graph']['errors'], m['classifier_graph']['probs']],\n"
        "                         {m['classifier_graph']['input']: x})\n"
        "print(json.dumps([m['classes'][i] for i in errors.argmin(1)]))\n"
        "assert 'noop_rt' not in sys.modules and 'torch' not in sys.modules\n"
    )
    bare = subprocess.run([sys.executable, "-c", code, str(tiny_bundle), *map(str, imgs)], capture_output=True,
                          text=True, timeout=120)
    assert bare.returncode == 0, bare.stderr
    assert bare.stderr == "", bare.stderr  # silent: no warning about an input that has a default
    res = runner.invoke(app, ["classify", *map(str, imgs), "--bundle", str(tiny_bundle), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(bare.stdout) == [r["top"][0]["class"] for r in json.loads(res.stdout)]


def test_bundle_classifies_like_the_checkpoint(tiny_bundle, tiny_ckpt, shape_images) -> None:
    imgs = [str(p) for p in sorted(shape_images.rglob("*.png"))]
    a = runner.invoke(app, ["classify", *imgs, "--bundle", str(tiny_bundle), "--json"])
    b = runner.invoke(app, ["classify", *imgs, "--ckpt", str(tiny_ckpt), "--json"])
    assert a.exit_code == 0 and b.exit_code == 0, a.output + b.output
    ra, rb = json.loads(a.stdout), json.loads(b.stdout)
    assert [r["backend"] for r in ra] == ["onnxruntime"] * len(imgs)
    assert [r["backend"] for r in rb] == ["torch"] * len(imgs)
    for x, y in zip(ra, rb, strict=True):
        assert x["top"][0]["class"] == y["top"][0]["class"]
        ex = {t["class"]: t["error"] for t in x["top"]}
        ey = {t["class"]: t["error"] for t in y["top"]}
        assert all(abs(ex[k] - ey[k]) < 1e-4 for k in ex)


def test_v_prediction_through_the_onnxruntime_graphs(tiny_sd_v, shape_images, tmp_path) -> None:
    """A v-prediction backbone: the exported scorer converts v to eps as the torch module does, and differs from
    treating v as eps (the raw output)."""
    from noop_rt.train.checkpoint import save_checkpoint
    from noop_rt.train.noop import TrainConfig
    from noop_rt.train.trainer import fewshot_split, train_checkpoint

    bb = load_backbone(tiny_sd_v)
    split = fewshot_split(shape_images, shots=1, val_shots=1, seed=0)
    ckpt, _ = train_checkpoint(bb, split, "a {}", TrainConfig(epochs=1, batch_size=2, meta_channels=(8,)),
                               show_progress=False)
    path = save_checkpoint(ckpt, tmp_path / "v.pt")
    out = tmp_path / "vbundle"
    export_bundle(path, out, ExportOptions(validate_images=collect_images(shape_images)), log=io.StringIO())
    m = json.loads((out / "manifest.json").read_text())
    assert m["backbone"]["prediction_type"] == "v_prediction"
    ort = OnnxRuntimeRunner(Bundle.open(out), "cpu")
    gen = torch.Generator().manual_seed(1)
    z0, eps = torch.randn(2, 4, 16, 16, generator=gen), torch.randn(2, 4, 16, 16, generator=gen)
    t = torch.tensor([100.0, 800.0])
    emb = ckpt.class_embeddings
    got = ort.run("scorer", {"z0": z0.numpy(), "eps": eps.numpy(), "timestep": t.numpy(),
                             "class_embeddings": emb.numpy()}, ["errors_l2"])[0]
    abar = bb.alphas_cumprod[t.long()].view(-1, 1, 1, 1)
    z_t = abar.sqrt() * z0 + (1 - abar).sqrt() * eps
    expected, raw_as_eps = np.zeros((2, 2)), np.zeros((2, 2))
    with torch.no_grad():
        for c in range(2):
            v = bb.unet(z_t, t, encoder_hidden_states=emb[c:c + 1].expand(2, -1, -1)).sample
            eps_hat = abar.sqrt() * v + (1 - abar).sqrt() * z_t  # Salimans & Ho: eps from v, written out here
            expected[:, c] = ((eps_hat - eps) ** 2).mean(dim=(1, 2, 3)).numpy()
            raw_as_eps[:, c] = ((v - eps) ** 2).mean(dim=(1, 2, 3)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4)
    assert np.abs(got - raw_as_eps).max() > 1e-3


def copy_bundle(src, tmp_path):
    dst = tmp_path / "b"
    shutil.copytree(src, dst)
    return dst


def test_tampered_missing_or_foreign_bundles_exit_1(tiny_bundle, shape_images, tmp_path) -> None:
    img = str(next((shape_images / "red_square").iterdir()))

    def classify(bundle) -> str:
        res = runner.invoke(app, ["classify", img, "--bundle", str(bundle)])
        assert res.exit_code == 1, res.output
        assert "Traceback" not in res.output
        lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
        return res.stderr

    b = copy_bundle(tiny_bundle, tmp_path / "1")  # same size, different bytes
    emb = np.load(b / "class_embeddings.npy")
    np.save(b / "class_embeddings.npy", emb + 1e-3)
    assert "class_embeddings.npy does not match the sha256" in classify(b)
    b = copy_bundle(tiny_bundle, tmp_path / "2")
    (b / "noise.onnx").unlink()
    assert "noise.onnx is missing" in classify(b)
    b = copy_bundle(tiny_bundle, tmp_path / "3")  # truncated weights
    with open(b / "weights.bin", "r+b") as fh:
        fh.truncate(1000)
    assert "weights.bin has 1000 bytes" in classify(b)
    b = copy_bundle(tiny_bundle, tmp_path / "4")  # swapped graphs
    (b / "noise.onnx").rename(b / "tmp.onnx")
    (b / "vae_encoder.onnx").rename(b / "noise.onnx")
    (b / "tmp.onnx").rename(b / "vae_encoder.onnx")
    message = classify(b)
    assert ("noise.onnx has" in message or "vae_encoder.onnx has" in message) and "bytes where" in message
    b = copy_bundle(tiny_bundle, tmp_path / "5")
    m = json.loads((b / "manifest.json").read_text())
    m["version"] = 1
    (b / "manifest.json").write_text(json.dumps(m))
    assert "bundle format 1" in classify(b) and "re-export" in classify(b)
    assert "manifest.json is missing" in classify(tmp_path)


def test_object_array_embeddings_are_refused_naming_the_file(tiny_bundle, shape_images, tmp_path) -> None:
    """A class_embeddings.npy holding a pickled object array, with the manifest's sha256 updated to match."""
    from noop_rt.runtime.bundle import sha256_file

    b = copy_bundle(tiny_bundle, tmp_path)
    np.save(b / "class_embeddings.npy", np.array([{"x": 1}, None], dtype=object), allow_pickle=True)
    m = json.loads((b / "manifest.json").read_text())
    m["files"]["class_embeddings.npy"] = {"sha256": sha256_file(b / "class_embeddings.npy"),
                                          "size": (b / "class_embeddings.npy").stat().st_size}
    (b / "manifest.json").write_text(json.dumps(m))
    img = str(next((shape_images / "red_square").iterdir()))
    res = runner.invoke(app, ["classify", img, "--bundle", str(b)])
    assert res.exit_code == 1 and "internal error" not in res.stderr, res.output
    assert "class_embeddings.npy is not a plain numpy array file" in res.stderr


def test_interrupted_export_leaves_nothing_behind(tiny_ckpt, tmp_path, monkeypatch) -> None:
    import noop_rt.build.export as export_mod

    real = export_mod.export_graph
    calls = {"n": 0}

    def dies_on_the_third_graph(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(export_mod, "export_graph", dies_on_the_third_graph)
    out = tmp_path / "exports" / "tiny"
    with pytest.raises(KeyboardInterrupt):
        export_bundle(tiny_ckpt, out, ExportOptions(), log=io.StringIO())
    assert calls["n"] == 3
    assert list((tmp_path / "exports").iterdir()) == []
    # a SIGKILLed export (no cleanup ran) leaves its staging folder; the next export of that bundle removes it
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname().replace("-", "_")
    (tmp_path / "exports" / f".tiny.export-{host}-{dead.pid}" / "unet").mkdir(parents=True)
    monkeypatch.setattr(export_mod, "export_graph", real)
    export_bundle(tiny_ckpt, out, ExportOptions(), log=io.StringIO())
    assert sorted(p.name for p in (tmp_path / "exports").iterdir()) == ["tiny"]


def test_failed_validation_exits_3_and_publishes_nothing(tiny_ckpt, tmp_path) -> None:
    out = tmp_path / "strict"
    res = runner.invoke(app, ["export", "--ckpt", str(tiny_ckpt), "--out", str(out), "--tolerance", "0"])
    assert res.exit_code == 3, res.output
    assert "validation failed" in res.stderr and "✗" in res.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_re_export_is_cached_and_a_different_bundle_needs_force(tiny_ckpt, tiny_bundle, tmp_path) -> None:
    log = io.StringIO()
    options = ExportOptions(images_per_batch=3, validate_images=[])
    out = tmp_path / "tiny"
    shutil.copytree(tiny_bundle, out)
    report = export_bundle(tiny_ckpt, out, options, log=log)
    assert report.cached and "found cached bundle" in log.getvalue()
    with pytest.raises(BadInputError, match="--force"):
        export_bundle(tiny_ckpt, out, ExportOptions(images_per_batch=5), log=log)
    report = export_bundle(tiny_ckpt, out, ExportOptions(images_per_batch=5, force=True), log=io.StringIO())
    assert not report.cached and Bundle.open(out).manifest["max_batch"] == 10


def test_fp16_bundle_runs_on_onnxruntime_cpu(tiny_ckpt, shape_images, tmp_path) -> None:
    out = tmp_path / "half"
    report = export_bundle(tiny_ckpt, out, ExportOptions(precision="fp16",
                                                         validate_images=collect_images(shape_images)),
                           log=io.StringIO())
    v = report.validation
    assert v["precision"] == "fp16" and v["passed"]
    m = onnx.load(str(out / "scorer.onnx"), load_external_data=False)
    inputs = {i.name: i.type.tensor_type.elem_type for i in m.graph.input}
    assert inputs["z0"] == onnx.TensorProto.FLOAT and inputs["timestep"] == onnx.TensorProto.FLOAT
    half = [t for t in m.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16]
    assert len(half) > 10  # the UNet's weights are fp16 inside; the graph's interface stays float32
    assert 0 < v["graphs"]["scorer:errors_l2"]["max_rel"] < 5e-2


def test_verify_hashes_everything_and_names_a_bad_file(tiny_bundle, tmp_path) -> None:
    res = runner.invoke(app, ["verify", str(tiny_bundle), "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["passed"] and report["files"] == len(json.loads((tiny_bundle / "manifest.json").read_text())
                                                      ["files"])
    b = copy_bundle(tiny_bundle, tmp_path)
    data = bytearray((b / "scorer.onnx").read_bytes())
    data[-5] ^= 0xFF  # same size, one byte flipped
    (b / "scorer.onnx").write_bytes(bytes(data))
    res = runner.invoke(app, ["verify", str(b)])
    assert res.exit_code == 1 and "scorer.onnx does not match the sha256" in res.stderr, res.output


def test_int8_classifier_is_quantized_and_gated_on_agreement(tiny_ckpt, tmp_path) -> None:
    """`--int8` quantizes the classifier graph (QDQ), calibrated on the checkpoint's recorded few-shot images; its top-1
    agreement with fp32 torch, recomputed here, is what the manifest's gate saw; an unreachable gate exits 3."""
    out = tmp_path / "q"
    res = runner.invoke(app, ["export", "--ckpt", str(tiny_ckpt), "--int8", "--out", str(out), "--min-agreement",
                              "0", "--json"])
    assert res.exit_code == 0, res.output
    m = json.loads((out / "manifest.json").read_text())
    assert m["precision"] == "int8" and "recorded fewshot images" in m["int8"]["calibration"]
    ops = {n.op_type for n in onnx.load(str(out / "classifier.onnx"), load_external_data=False).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    ckpt = load_checkpoint(tiny_ckpt)
    from noop_rt.runtime.images import load_image

    val = np.stack([load_image(p, 32) for p in ckpt.train["images"]["val"]])
    import noop_rt

    q = noop_rt.load(out).classify(val, top_k=1)
    f = noop_rt.load(tiny_ckpt, backend="torch").classify(val, top_k=1)
    agree = np.mean([a.label == b.label for a, b in zip(q, f, strict=True)])
    v = json.loads((out / "validation.json").read_text())
    assert v["classifier"]["top1_agreement"] == pytest.approx(agree)
    if importlib.util.find_spec("openvino") is not None:  # the same gate on OpenVINO's CPU plugin, recomputed here
        o = noop_rt.load(out, backend="openvino").classify(val, top_k=1)
        assert v["classifier_openvino"]["ran"], v["classifier_openvino"]
        assert v["classifier_openvino"]["top1_agreement"] == pytest.approx(
            np.mean([a.label == b.label for a, b in zip(o, f, strict=True)]))
    res = runner.invoke(app, ["export", "--ckpt", str(tiny_ckpt), "--int8", "--out", str(tmp_path / "no"),
                              "--min-agreement", "1.01"])
    assert res.exit_code == 3 and not (tmp_path / "no").exists(), res.output


def test_the_manifest_describes_the_whole_preprocessing(tiny_bundle) -> None:
    """A runtime that has only the bundle must composite transparency on white, take an animated image's first
    frame and scale 16-bit images as noop-rt does: the manifest says each (the shipped demo's too)."""
    from noop_rt.demo import BUNDLE_DIR

    for root in (pathlib.Path(tiny_bundle), BUNDLE_DIR):
        pre = json.loads((root / "manifest.json").read_text())["preprocessing"]
        assert "white" in pre["alpha"] and "first frame" in pre["decode"] and "65535" in pre["modes"]
        assert "EXIF" in pre["decode"] and pre["range"] == [-1.0, 1.0]


def test_no_text_encoder_bundle_classifies_its_trained_classes_only(tiny_bundle, tiny_ckpt, shape_images,
                                                                    tmp_path) -> None:
    """--no-text-encoder ships the cached class embeddings only: no text-encoder graph, no tokenizer; the trained
    classes classify as with the full bundle, and new class names are one line naming the missing encoder."""
    out = tmp_path / "lean"
    res = runner.invoke(app, ["export", "--ckpt", str(tiny_ckpt), "--out", str(out), "--no-text-encoder",
                              "--images-per-batch", "3", "--validate-data", str(shape_images)])
    assert res.exit_code == 0, res.output
    m = json.loads((out / "manifest.json").read_text())
    assert "text_encoder" not in m["graphs"] and m["text_encoder"] is False
    assert not (out / "text_encoder.onnx").exists() and not (out / "tokenizer").exists()
    assert not any(f.startswith("tokenizer/") or f == "text_encoder.onnx" for f in m["files"])
    full = json.loads((tiny_bundle / "manifest.json").read_text())
    assert m["weights"]["bytes"] < full["weights"]["bytes"]  # the text encoder's weights are not shipped
    imgs = [str(p) for p in sorted(shape_images.rglob("*.png"))]
    for method in ("noop", "baseline"):  # the classifier graph, and the scorer on the cached embeddings
        lean = runner.invoke(app, ["classify", *imgs, "--bundle", str(out), "--method", method, "--json"])
        whole = runner.invoke(app, ["classify", *imgs, "--bundle", str(tiny_bundle), "--method", method, "--json"])
        assert lean.exit_code == 0 and whole.exit_code == 0, lean.output + whole.output
        assert ([r["top"][0]["class"] for r in json.loads(lean.stdout)]
                == [r["top"][0]["class"] for r in json.loads(whole.stdout)])
    res = runner.invoke(app, ["classify", imgs[0], "--bundle", str(out), "--classes", "red square,green triangle"])
    assert res.exit_code == 1 and "Traceback" not in res.output and len(res.stderr.strip().splitlines()) == 1
    assert "without its text encoder" in res.stderr and "'green triangle'" in res.stderr
    verified = runner.invoke(app, ["verify", str(out)])
    assert verified.exit_code == 0, verified.output
