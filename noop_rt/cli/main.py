"""The `noop-rt` typer app: plain help labels, the error mapping (NoopError -> one `error:` line on stderr and its
exit code; a traceback only with --debug) and the console script."""

from __future__ import annotations

import re
import sys
from typing import Annotated, Any

import typer

from noop_rt.runtime.errors import NoopError, ReportedInterrupt


def _plain_help_labels() -> None:
    """Help shows plain value labels (`IMAGE...`, `--shots N`, `--lr-noise X`) instead of typer's type labels
    (`<list[Path]>`, `<int range>`, `<float>`) and brace decoration (`{IMAGE...}...`)."""
    from typer.core import TyperArgument, TyperOption

    arg_label, arg_usage = TyperArgument.display_type_rich, TyperArgument._usage_display_name
    opt_label = TyperOption.display_type_rich
    plain = {"int": "N", "float": "X", "str": "TEXT", "Path": "PATH"}

    def argument_label(self: Any, ctx: Any) -> str:
        return "" if self.metavar else arg_label(self, ctx=ctx)

    def argument_usage(self: Any) -> str:
        return str(self.metavar) if self.metavar else arg_usage(self)

    def option_label(self: Any, ctx: Any) -> str | None:
        if self.metavar is not None or self.is_flag:
            return opt_label(self, ctx=ctx)
        label = str(opt_label(self, ctx=ctx) or "").strip("<>").split(" ")[0]
        return plain.get(label, label.upper() or None)

    TyperArgument.display_type_rich = argument_label  # type: ignore[method-assign]
    TyperArgument._usage_display_name = argument_usage  # type: ignore[method-assign]
    TyperOption.display_type_rich = option_label  # type: ignore[method-assign]


_plain_help_labels()
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None,
                  help="Diffusion classifiers at one UNet pass per class: train NoOp, export to ONNX, build "
                       "TensorRT engines, classify.")
_state: dict[str, bool] = {"debug": False, "interrupt_reported": False}


def _fail(exc: BaseException) -> None:
    code = exc.exit_code if isinstance(exc, NoopError) else 1
    if _state["debug"]:
        import traceback

        traceback.print_exception(exc, file=sys.stderr)
    message = str(exc) if isinstance(exc, NoopError) else f"internal error: {type(exc).__name__}: {exc}"
    print(f"error: {message.splitlines()[0] if message else type(exc).__name__}", file=sys.stderr)
    raise typer.Exit(code)


def guarded(fn: Any) -> Any:
    """Call the library; map any exception to one line on stderr (traceback only with --debug)."""
    try:
        return fn()
    except ReportedInterrupt:  # the job said what it kept: exit 130 without "error: aborted"
        _state["interrupt_reported"] = True
        raise
    except (typer.Exit, typer.Abort, KeyboardInterrupt):
        raise
    except BrokenPipeError:  # stdout closed early (`| head`): stop quietly, as shell tools do
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise typer.Exit(141) from None
    except Exception as exc:
        _fail(exc)


def _version(show: bool) -> None:
    if show:
        from noop_rt import __version__

        print(f"noop-rt {__version__}")
        raise typer.Exit()


@app.callback()
def main(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
         version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                               help="Print the version and exit.")] = False) -> None:
    _state["debug"] = debug



RAY_ADDRESS = re.compile(r"^(auto|local|ray://\S+|[\w.-]+:\d+)$")


def ray_address_argv(argv: list[str]) -> list[str]:
    """`batch … --ray ADDRESS` (design §3) -> `--ray --ray-address ADDRESS`: the option takes an optional value, which
    typer cannot express. Only tokens that look like a Ray address (auto, local, ray://…, host:port) are taken."""
    if "batch" not in argv:
        return argv
    out = list(argv)
    for i, arg in enumerate(out[:-1]):
        if arg == "--ray" and RAY_ADDRESS.match(out[i + 1]):
            out[i:i + 2] = ["--ray", "--ray-address", out[i + 1]]
            break
    return out


def run() -> None:
    """The console script: usage errors (missing argument, unknown option, bad value) are one `error:` line and
    exit 2, like every other error, instead of click's boxed panel."""
    # typer vendors its own click: find its UsageError (base of BadParameter, MissingParameter, NoSuchOption)
    usage_error = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")
    argv = ray_address_argv(sys.argv[1:])
    try:
        code = app(args=argv, prog_name="noop-rt", standalone_mode=False)
    except usage_error as exc:
        where = f"noop-rt {exc.ctx.info_name} --help" if exc.ctx is not None and exc.ctx.parent else "noop-rt --help"
        if exc.format_message().strip():  # empty: the help was shown for a bare `noop-rt`
            print(f"error: {exc.format_message()} (see {where})", file=sys.stderr)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        code = 130
    if code == 130 and not _state["interrupt_reported"]:  # typer turns Ctrl-C into Exit(130) without a word
        print("error: aborted", file=sys.stderr)
    sys.exit(code if isinstance(code, int) else 0)
