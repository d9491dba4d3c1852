"""`noop-rt batch`, `bench` and `serve`: the jobs and the server, over `LoadOptions` and the API."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from noop_rt.cli.main import app, guarded
from noop_rt.cli.options import (
    BackendOpt,
    BundleOpt,
    CascadeThresholdOpt,
    CkptOpt,
    ClassesOpt,
    ConcurrencyOpt,
    DeviceOpt,
    EnginesOpt,
    EscalateOpt,
    JsonOpt,
    LoraOpt,
    LoraScaleOpt,
    LossOpt,
    MaxBatchOpt,
    MethodOpt,
    ModelOpt,
    NoisesOpt,
    PromptsOpt,
    SeedOpt,
    ShortlistOpt,
    StagesOpt,
    TemplateOpt,
    ThreadsOpt,
    TopKOpt,
    load_request,
)
from noop_rt.runtime.backends.base import installed
from noop_rt.runtime.errors import BadInputError, MissingDependencyError, UsageError
from noop_rt.runtime.extras import install_hint
from noop_rt.runtime.outputs import check_writable
from noop_rt.serve import ServeOptions


# ---------------------------------------------------------------------------------------------- batch / bench
@app.command()
def batch(
    inputs: Annotated[list[str], typer.Argument(metavar="INPUT...", help="Images, folders, globs, or .txt/.parquet "
                                                "lists of paths.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", metavar="FILE", help="FILE.parquet or FILE.jsonl (resumes if it "
                                      "exists).")],
    bundle: BundleOpt = None, ckpt: CkptOpt = None, model: ModelOpt = None, classes: ClassesOpt = None,
    prompts: PromptsOpt = None, template: TemplateOpt = None, backend: BackendOpt = "auto", method: MethodOpt = None,
    noises: NoisesOpt = None, stages: StagesOpt = None, cascade_threshold: CascadeThresholdOpt = None,
    shortlist: ShortlistOpt = None, escalate: EscalateOpt = None, loss: LossOpt = None, seed: SeedOpt = 0,
    top_k: TopKOpt = 5,
    ray: Annotated[bool, typer.Option("--ray", help="Run on Ray Data: a local cluster, or `--ray ADDRESS` "
                                      "(auto, ray://host:port, host:port) / RAY_ADDRESS for an existing one.")] = False,
    ray_address: Annotated[str | None, typer.Option("--ray-address", metavar="ADDRESS",
                                                    help="Same as --ray ADDRESS.")] = None,
    workers: Annotated[int, typer.Option("--workers", min=1, help="Ray actors (one model copy each).")] = 1,
    gpus_per_worker: Annotated[float, typer.Option("--gpus-per-worker", min=0.0, help="GPUs per Ray actor.")] = 0.0,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images per classification call.")] = 16,
    threads: ThreadsOpt = None, concurrency: ConcurrencyOpt = None,
    ray_block_size: Annotated[int | None, typer.Option("--ray-block-size", min=1, metavar="N", help="Paths per Ray "
                                                       "actor call (default: up to 8 batches, at least 4 blocks "
                                                       "per worker).")] = None,
    device: DeviceOpt = "auto", max_batch: MaxBatchOpt = None, engines: EnginesOpt = None, lora: LoraOpt = None,
    lora_scale: LoraScaleOpt = None, as_json: JsonOpt = False,
) -> None:
    """Classify many images into a parquet/jsonl file, in process or on a Ray cluster; resumable."""
    def go() -> None:
        from noop_rt.jobs.batch import BatchOptions, run_batch

        load = load_request(bundle, ckpt, model, backend=backend, device=device, method=method, classes=classes,
                            prompts=prompts, template=template, noises=noises, stages=stages,
                            cascade_threshold=cascade_threshold, shortlist=shortlist,
                            escalate=escalate, loss=loss, seed=seed,
                            max_batch=max_batch, engines=engines, lora=lora, lora_scale=lora_scale)
        options = BatchOptions(top_k=top_k, batch_size=batch_size, ray=ray or ray_address is not None,
                               ray_address=ray_address, workers=workers, gpus_per_worker=gpus_per_worker,
                               threads=threads, concurrency=concurrency, ray_block_size=ray_block_size)
        check_writable(out, "--out")
        report = run_batch(inputs, out, load, options)
        summary = {"out": str(report.out), "total": report.total, "skipped": report.skipped,
                   "classified": report.classified, "failed": report.failed, "seconds": round(report.seconds, 2),
                   "images_per_s": round(report.images_per_s, 2), "backend": report.backend, "mode": report.mode,
                   "drift": report.drift, "engine": report.engine}
        if as_json:
            print(json.dumps(summary, indent=2))
        else:
            print(f"wrote {report.out}: {report.total} paths ({report.classified} classified, {report.failed} "
                  f"unreadable, {report.skipped} already there) in {report.seconds:.1f} s, "
                  f"{report.images_per_s:.1f} images/s ({report.mode}, {report.backend})")
        if report.failed and not report.classified:  # e.g. a mistyped folder: not a silent success
            raise BadInputError(f"none of the {report.failed} new input(s) could be read (first: "
                                f"{report.first_error}); their error rows are in {report.out}")

    guarded(go)


@app.command()
def bench(
    bundle: BundleOpt = None, ckpt: CkptOpt = None,
    backbone: Annotated[str, typer.Option("--backbone", metavar="NAME", help="'ckpt' (the bundle/ckpt/demo model) "
                                          "or 'sd15-shape' / 'sdxl-shape' (SD-1.5 / SDXL UNet architecture, random "
                                          "weights).")] = "ckpt",
    num_classes: Annotated[int, typer.Option("--num-classes", min=2, help="Classes for sd15-shape.")] = 37,
    baseline_noises: Annotated[int, typer.Option("--baseline-noises", min=1, help="Pairs of the baseline.")] = 100,
    measured_pairs: Annotated[int, typer.Option("--measured-pairs", min=1, help="Baseline pairs actually timed; "
                                                "the rest extrapolated (labelled).")] = 10,
    backends: Annotated[str, typer.Option("--backends", metavar="A,B", help="Comma-separated: torch, onnxruntime, "
                                          "openvino, tensorrt.")] = "torch,onnxruntime",
    images: Annotated[Path | None, typer.Option("--images", metavar="DIR", help="Folder of images to time on.")]
        = None,
    runs: Annotated[int, typer.Option("--runs", min=1, help="Timed images per backend.")] = 10,
    device: DeviceOpt = "auto",
    fp16: Annotated[bool, typer.Option("--fp16", help="Half precision (torch on CUDA; fp16 bundle for sd15-shape).")]
        = False,
    startup: Annotated[bool, typer.Option("--startup/--no-startup", help="Also time a fresh `noop-rt classify` "
                                          "process (import, open, first image).")] = True,
    cache_dir: Annotated[Path, typer.Option("--cache-dir", metavar="DIR", help="Where sd15-shape models/bundles "
                                            "are kept.")] = Path("~/.cache/noop-rt"),
    out: Annotated[Path | None, typer.Option("--out", metavar="FILE", help="Write the report as JSON.")] = None,
    as_json: JsonOpt = False,
    plot_file: Annotated[Path | None, typer.Option("--plot", metavar="FILE", help="Write a latency bar chart "
                                                   "(PNG).")] = None,
    engines: EnginesOpt = None,
) -> None:
    """Latency/throughput of NoOp vs the N-noise baseline per backend, measured in one run."""
    def go() -> None:
        from noop_rt.jobs.bench import BenchOptions, bench_command, check_names

        options = BenchOptions(backends=[b.strip() for b in backends.split(",") if b.strip()],
                               baseline_noises=baseline_noises, baseline_measured_pairs=measured_pairs, runs=runs,
                               device=device, fp16=fp16, startup=startup)
        names = check_names(options.backends)
        if out is not None:
            check_writable(out, "--out")
        if plot_file is not None:
            check_writable(plot_file, "--plot")
            if not installed("matplotlib"):
                raise MissingDependencyError(f"--plot needs matplotlib: {install_hint('train')} (or pip install "
                                             "matplotlib)")
        if backbone == "ckpt":
            report, table = bench_command(options, bundle=bundle, ckpt=ckpt, images=images, engines=engines)
        else:
            fixture = shape_fixture(backbone, bundle, ckpt, num_classes, cache_dir, fp16,
                                     bundle_needed=any(n != "torch" for n in names))
            report, table = bench_command(options, bundle=fixture.bundle, ckpt=fixture.ckpt, images=images,
                                          engines=engines, backbone=backbone, reference_gflop=fixture.reference_gflop)
        print(json.dumps(report, indent=2) if as_json else table)
        if out is not None:
            from noop_rt.runtime.bundle import write_json_atomic

            write_json_atomic(out, report)
        if plot_file is not None:
            from noop_rt.jobs.bench import plot

            plot(report, plot_file)

    guarded(go)


def shape_fixture(backbone: str, bundle: Path | None, ckpt: Path | None, classes: int, cache_dir: Path, fp16: bool,
                   bundle_needed: bool) -> Any:
    """`bench --backbone NAME-shape`: the build side makes (once, cached) the random-weight model, its checkpoint and
    bundle; bench then times them through the API like any other model."""
    from noop_rt.build import SHAPE_FIXTURES
    from noop_rt.runtime.extras import require_torch_side

    if backbone not in SHAPE_FIXTURES:
        from noop_rt.runtime.suggest import suggest

        raise suggest(backbone, ("ckpt", *SHAPE_FIXTURES), "backbone")
    if bundle is not None or ckpt is not None:
        raise UsageError(f"--backbone {backbone} builds its own model; drop --bundle/--ckpt")
    require_torch_side(f"`noop-rt bench --backbone {backbone}`")
    from noop_rt.build.shape_fixtures import prepare

    return prepare(backbone, classes, cache_dir, fp16=fp16, bundle=bundle_needed)


@app.command()
def serve(
    bundle: BundleOpt = None, ckpt: CkptOpt = None, model: ModelOpt = None, classes: ClassesOpt = None,
    prompts: PromptsOpt = None, template: TemplateOpt = None, backend: BackendOpt = "auto", method: MethodOpt = None,
    noises: NoisesOpt = None, stages: StagesOpt = None, cascade_threshold: CascadeThresholdOpt = None,
    shortlist: ShortlistOpt = None, escalate: EscalateOpt = None, loss: LossOpt = None, seed: SeedOpt = 0,
    top_k: TopKOpt = 5,
    host: Annotated[str, typer.Option("--host", metavar="HOST", help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, metavar="PORT", help="HTTP port (0: any free "
                                      "port; the printed URL says which).")] = 8000,
    replicas: Annotated[int, typer.Option("--replicas", min=1, help="Model replicas (one classifier each).")] = 1,
    gpus_per_replica: Annotated[float, typer.Option("--gpus-per-replica", min=0.0, help="GPUs per replica.")] = 0.0,
    threads: Annotated[int | None, typer.Option("--threads", min=1, help="Engine threads per replica (default: one "
                                                "per core with one local replica, or the engine's own with "
                                                "--concurrent-batches 1; the cores split between several replicas; "
                                                "the engine's own on a cluster).")] = None,
    max_batch_size: Annotated[int, typer.Option("--max-batch-size", min=1, help="Images gathered into one "
                                                "B*C UNet batch.")] = 8,
    concurrent_batches: Annotated[int | None, typer.Option("--concurrent-batches", min=1, help="Batches a replica "
                                                           "runs at once (default: 2 on onnxruntime, else 1).")] = None,
    batch_wait_ms: Annotated[float, typer.Option("--batch-wait-ms", min=0.0, help="Longest wait for a batch to "
                                                 "fill when one can start at once (requests that arrive while all "
                                                 "of a replica's batches run are batched anyway).")]
    = ServeOptions.batch_wait_ms,
    max_upload_mb: Annotated[float, typer.Option("--max-upload-mb", min=0.0, help="Largest request body (0: no "
                                                 "limit).")] = 10.0,
    ray_address: Annotated[str | None, typer.Option("--ray", metavar="ADDRESS", help="An existing Ray cluster "
                                                    "(default: RAY_ADDRESS, else a local one).")] = None,
    request_timeout_s: Annotated[float, typer.Option("--request-timeout-s", min=0.001, metavar="X", help="A request "
                                                     "still running after X s answers 504 and its work is "
                                                     "dropped.")] = ServeOptions.request_timeout_s,
    max_pixels: Annotated[int | None, typer.Option("--max-pixels", min=1, metavar="N", help="Largest image, in pixels, "
                                                   "refused from its header before decoding (default: 64 x R^2, at "
                                                   "least 16 M); a request may hold 4 x this in all.")] = None,
    api_key: Annotated[list[str] | None, typer.Option("--api-key", metavar="KEY", help="Require Authorization: "
                                                      "Bearer KEY on every route but the probes and the page "
                                                      "(repeatable; also NOOP_RT_API_KEY).")] = None,
    api_key_file: Annotated[Path | None, typer.Option("--api-key-file", metavar="FILE", help="Keys, one per "
                                                      "line.")] = None,
    ssl_certfile: Annotated[Path | None, typer.Option("--ssl-certfile", metavar="PEM", help="Serve HTTPS with this "
                                                      "certificate chain (with --ssl-keyfile).")] = None,
    ssl_keyfile: Annotated[Path | None, typer.Option("--ssl-keyfile", metavar="PEM", help="The certificate's "
                                                     "private key (unencrypted PEM).")] = None,
    keep_alive_s: Annotated[int, typer.Option("--keep-alive-s", min=1, metavar="X", help="Close an idle kept-alive "
                                              "connection after X s.")] = ServeOptions.keep_alive_s,
    header_timeout_s: Annotated[float, typer.Option("--header-timeout-s", min=0.001, metavar="X", help="A request's "
                                                    "line and headers must arrive within X s (else 408, closed).")]
    = ServeOptions.header_timeout_s,
    body_timeout_s: Annotated[float, typer.Option("--body-timeout-s", min=0.001, metavar="X", help="Longest pause "
                                                  "in a request body (else the connection is closed).")]
    = ServeOptions.body_timeout_s,
    max_header_kb: Annotated[int, typer.Option("--max-header-kb", min=1, metavar="N", help="Largest request line "
                                               "and headers, in KiB (431 beyond).")]
    = ServeOptions.max_header_bytes // 1024,
    max_headers: Annotated[int, typer.Option("--max-headers", min=8, metavar="N", help="Most header fields in a "
                                             "request (431 beyond).")] = ServeOptions.max_headers,
    max_connections: Annotated[int, typer.Option("--max-connections", min=1, metavar="N", help="Most open "
                                                 "connections (more: 503, closed).")] = ServeOptions.max_connections,
    allowed_hosts: Annotated[list[str] | None, typer.Option("--allowed-hosts", metavar="NAME", help="Host header "
                                                            "names served, e.g. api.example.org or *.example.org "
                                                            "(repeatable; '*': any; default: loopback names on a "
                                                            "loopback --host, else any).")] = None,
    cors_origin: Annotated[list[str] | None, typer.Option("--cors-origin", metavar="ORIGIN", help="A web origin "
                                                          "whose pages may call the API, e.g. "
                                                          "https://app.example.org (repeatable; default: none).")]
    = None,
    device: DeviceOpt = "auto", max_batch: MaxBatchOpt = None, engines: EnginesOpt = None, lora: LoraOpt = None,
    lora_scale: LoraScaleOpt = None,
) -> None:
    """Serve the classifier over HTTP on Ray Serve: /v1/classify, the KServe v2 protocol, a web page at /."""
    def go() -> None:
        from noop_rt.serve import run_server

        load = load_request(bundle, ckpt, model, backend=backend, device=device, method=method, classes=classes,
                            prompts=prompts, template=template, noises=noises, stages=stages,
                            cascade_threshold=cascade_threshold, shortlist=shortlist,
                            escalate=escalate, loss=loss, seed=seed,
                            max_batch=max_batch, engines=engines, lora=lora, lora_scale=lora_scale)
        from noop_rt.serve.auth import KEY_ENV, is_loopback, key_digest, read_keys

        keys = read_keys(api_key or (), api_key_file)
        if not keys and not is_loopback(host):
            print(f"warning: serving on {host} without an API key: anyone who reaches the port can use the model "
                  f"(--api-key KEY or {KEY_ENV})", file=sys.stderr)
        digests = tuple(key_digest(k) for k in keys)
        from noop_rt.serve.options import tls_files
        from noop_rt.serve.origins import check_origins

        certfile, keyfile = tls_files(ssl_certfile, ssl_keyfile)
        run_server(load, ServeOptions(api_key_digests=digests, max_pixels=max_pixels, ssl_certfile=certfile,
                                      ssl_keyfile=keyfile, keep_alive_s=keep_alive_s,
                                      header_timeout_s=header_timeout_s, body_timeout_s=body_timeout_s,
                                      max_header_bytes=max_header_kb * 1024, max_headers=max_headers,
                                      max_connections=max_connections, cors_origins=check_origins(cors_origin or ()),
                                      allowed_hosts=tuple(h.strip().lower() for h in allowed_hosts or () if h.strip()),
                                      request_timeout_s=request_timeout_s, host=host, port=port,
                                      replicas=replicas, gpus_per_replica=gpus_per_replica, threads=threads,
                                      max_batch_size=max_batch_size,
                                      concurrent_batches=concurrent_batches, batch_wait_ms=batch_wait_ms,
                                      max_upload_mb=max_upload_mb, ray_address=ray_address, top_k=top_k))

    guarded(go)


