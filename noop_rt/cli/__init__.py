"""`noop-rt`: the command line. Arguments and printing only: each command parses, builds what the Python API takes
(`LoadOptions` for `noop_rt.load`, the jobs' options), calls it and prints. May import everything below it.

main.py: the typer app, the error mapping and the console script; options.py: shared options and the source ->
`LoadOptions` -> `noop_rt.load` steps; classify.py, pipeline.py, jobs.py, demo.py: the commands, in the order
`noop-rt --help` lists them.
"""

from noop_rt.cli import classify, pipeline, jobs, demo  # noqa: F401, I001 - registers the commands in `--help` order
from noop_rt.cli.main import app, ray_address_argv, run

__all__ = ["app", "ray_address_argv", "run"]
