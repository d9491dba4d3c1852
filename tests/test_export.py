"""ONNX export: graphs, parity, dynamic batch, the bundle contract and its errors, atomicity."""

from __future__ import annotations

import io
import json
import shutil
import socket
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from typer.testing import CliRunner

from noop_rt.backbone import load_backbone
from noop_rt.bundle import Bundle
from noop_rt.checkpoint import load_checkpoint
from noop_rt.cli import app
from noop_rt.errors import BadInputError, BundleError
from noop_rt.export import ExportOptions, collect_images, export_bundle
from noop_rt.runtime.onnx_backend import OnnxBackend

runner = CliRunner()


def test_bundle_layout_manifest_and_validation(tiny_bundle) -> None:
    names = {p.name for p in tiny_bundle.iterdir()}
    assert {"manifest.json", "validation.json", "unet.onnx", "text_encoder.onnx", "vae_encoder.onnx", "noise.onnx",
            "class_embeddings.npy", "tokenizer"} <= names
    for graph in ("unet", "text_encoder", "vae_encoder", "noise"):
        onnx.checker.check_model(str(tiny_bundle / f"{graph}.onnx"))
        assert onnx.load(str(tiny_bundle / f"{graph}.onnx")).opset_import[0].version >= 17
    m = json.loads((tiny_bundle / "manifest.json").read_text())
    assert m["classes"] == ["blue circle", "red square"] and m["t_star"] == 500 and m["precision"] == "fp32"
    assert 0 < m["abar_t_star"] < 1 and m["max_batch"] == 3 * 2 and len(m["alphas_cumprod"]) == 1000
    assert set(m["files"]) >= {"unet.onnx", "class_embeddings.npy", "validation.json"}
    v = json.loads((tiny_bundle / "validation.json").read_text())
    assert v["passed"] and v["classifier"]["top1_agreement"] == 1.0
    for g in v["graphs"].values():
        assert g["max_rel"] < 1e-4  # fp32 TorchScript export on onnxruntime CPU


def test_unet_graph_has_a_dynamic_batch(tiny_bundle, tiny_ckpt) -> None:
    bundle = Bundle.open(tiny_bundle)
    ort = OnnxBackend(bundle, device="cpu")
    ckpt = load_checkpoint(tiny_ckpt)
    bb = load_backbone(ckpt.backbone_source)
    c = len(bundle.classes)
    for batch in (1, c, 3 * c):
        z = torch.randn(batch, 4, 16, 16)
        t = torch.randint(0, 1000, (batch,)).float()  # one call may mix timesteps
        emb = ckpt.class_embeddings[torch.arange(batch) % c]
        with torch.no_grad():
            ref = bb.predict_eps(z, t, emb)
        assert torch.allclose(ort.predict_eps(z, t, emb), ref, atol=1e-4)


def test_bundle_classifies_like_the_checkpoint(tiny_bundle, tiny_ckpt, shape_images) -> None:
    imgs = [str(p) for p in sorted(shape_images.rglob("*.png"))]
    a = runner.invoke(app, ["classify", *imgs, "--bundle", str(tiny_bundle), "--json"])
    b = runner.invoke(app, ["classify", *imgs, "--ckpt", str(tiny_ckpt), "--json"])
    assert a.exit_code == 0 and b.exit_code == 0, a.output + b.output
    ra, rb = json.loads(a.stdout), json.loads(b.stdout)
    assert [r["backend"] for r in ra] == ["onnxruntime"] * len(imgs)
    for x, y in zip(ra, rb, strict=True):
        assert x["top"][0]["class"] == y["top"][0]["class"]
        ex = {t["class"]: t["error"] for t in x["top"]}
        ey = {t["class"]: t["error"] for t in y["top"]}
        assert all(abs(ex[k] - ey[k]) < 1e-4 for k in ex)


def test_new_classes_embed_through_the_text_encoder_graph(tiny_bundle, shape_images) -> None:
    img = str(next((shape_images / "red_square").iterdir()))
    res = runner.invoke(app, ["classify", img, "--bundle", str(tiny_bundle), "--classes", "red,green,blue",
                              "--json"])
    assert res.exit_code == 0, res.output
    assert {t["class"] for t in json.loads(res.stdout)[0]["top"]} == {"red", "green", "blue"}


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
        return res.stderr

    b = copy_bundle(tiny_bundle, tmp_path / "1")
    emb = np.load(b / "class_embeddings.npy")
    np.save(b / "class_embeddings.npy", emb + 1e-3)
    assert "does not match the sha256" in classify(b)
    b = copy_bundle(tiny_bundle, tmp_path / "2")
    (b / "noise.onnx").unlink()
    assert "noise.onnx is missing" in classify(b)
    b = copy_bundle(tiny_bundle, tmp_path / "3")
    m = json.loads((b / "manifest.json").read_text())
    m["version"] = 0
    (b / "manifest.json").write_text(json.dumps(m))
    assert "format version 0" in classify(b)
    assert "manifest.json is missing" in classify(tmp_path)


def test_interrupted_export_leaves_nothing_behind(tiny_ckpt, tmp_path, monkeypatch) -> None:
    import noop_rt.export as export_mod

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


def test_external_data_is_consolidated_into_one_file(tiny_ckpt, tmp_path) -> None:
    out = tmp_path / "ext"
    export_bundle(tiny_ckpt, out, ExportOptions(external_data_threshold=1), log=io.StringIO())
    assert (out / "unet.onnx.data").is_file()
    assert (out / "unet.onnx").stat().st_size < (out / "unet.onnx.data").stat().st_size
    bundle = Bundle.open(out)
    assert "unet.onnx.data" in bundle.manifest["files"]
    onnx.checker.check_model(str(out / "unet.onnx"))
    assert OnnxBackend(bundle, device="cpu").encode(torch.zeros(1, 3, 32, 32)).shape == (1, 4, 16, 16)


def test_fp16_bundle_runs_on_onnxruntime_cpu(tiny_ckpt, shape_images, tmp_path) -> None:
    out = tmp_path / "half"
    report = export_bundle(tiny_ckpt, out, ExportOptions(precision="fp16",
                                                         validate_images=collect_images(shape_images)),
                           log=io.StringIO())
    v = report.validation
    assert v["precision"] == "fp16" and v["passed"]
    m = onnx.load(str(out / "unet.onnx"))
    types = {i.name: i.type.tensor_type.elem_type for i in m.graph.input}
    assert types["sample"] == onnx.TensorProto.FLOAT16 and types["timestep"] == onnx.TensorProto.FLOAT
    assert 0 < v["graphs"]["unet"]["max_rel"] < 5e-2


def test_bundle_open_errors(tmp_path) -> None:
    with pytest.raises(BundleError, match="not found"):
        Bundle.open(tmp_path / "nothing")
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        Bundle.open(tmp_path)
    (tmp_path / "manifest.json").write_text('{"format": "other"}')
    with pytest.raises(BundleError, match="not a noop-rt bundle"):
        Bundle.open(tmp_path)
