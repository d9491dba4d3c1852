"""`noop-rt serve`: the classifier behind HTTP on Ray Serve.

One Ray Serve application: a FastAPI ingress (`/v1/classify`, the KServe v2 protocol, health, metrics, the web page
at `/`) in front of model replicas, each holding one classifier opened with `noop_rt.load`, gathering concurrent
requests into one B*C UNet batch with `@serve.batch`. Importing this package does not import ray: `run_server`
does, and says how to install it when it is missing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from noop_rt.serve.options import APP_NAME, ServeOptions

if TYPE_CHECKING:
    from noop_rt.api import LoadOptions

__all__ = ["APP_NAME", "ServeOptions", "run_server"]

def run_server(load: LoadOptions, options: ServeOptions) -> None:
    """Serve until SIGINT/SIGTERM: print the URL on stdout once ready, then drain in-flight requests and return.

    `load`: what `noop_rt.load` opens; each replica opens its own classifier from it."""
    from noop_rt.serve.server import serve_forever

    serve_forever(load, options)
