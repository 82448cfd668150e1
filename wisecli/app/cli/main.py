"""Entry point: wires the commands and maps errors to one-line messages and exit codes.

Exit codes: 0 ok, 1 bad input (a ``WiseError``), 2 bad usage, 3 a ``--min-*`` gate failed,
4 an internal error (a bug: please report it with the WISE_DEBUG=1 traceback), 130 interrupted.
"""
from __future__ import annotations

import os
import sys
from typing import Annotated, Optional

import typer
from typer.exceptions import TyperException

from wisecli import __version__
from wisecli.errors import WiseError
from wisecli.app.cli import console
from wisecli.app.cli.edit import edit
from wisecli.app.cli.eval_cmd import eval_cmd
from wisecli.app.cli.export import export
from wisecli.app.cli.generate import generate
from wisecli.app.cli.info import info
from wisecli.app.cli.serve import serve

INTERNAL_ERROR = 4

app = typer.Typer(
    name="wise", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    help="Lifelong knowledge edits (WISE) for language-model checkpoints, offline.",
)


def _version(value: bool) -> None:
    if value:
        console.out.print(f"wise {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[Optional[bool], typer.Option(
        "--version", callback=_version, is_eager=True, help="Print the version and exit.")] = None) -> None:
    """Lifelong knowledge edits (WISE) for language-model checkpoints, offline."""


app.command("edit")(edit)
app.command("eval")(eval_cmd)
app.command("generate")(generate)
app.command("info")(info)


app.command("serve")(serve)
app.command("export")(export)


def _register_bench() -> None:
    try:
        from wisecli.app.cli.bench import bench
    except ImportError:
        return
    app.command("bench")(bench)


_register_bench()


def _quiet_libraries(debug: bool) -> None:
    """Our progress bars and messages only: transformers' own bars and notices go."""
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    if not debug:
        hf_logging.set_verbosity_error()
        import warnings
        warnings.filterwarnings("ignore")


def main() -> None:
    """Run the CLI: a WiseError becomes one line on stderr and its exit code."""
    debug = os.environ.get("WISE_DEBUG") == "1"
    _quiet_libraries(debug)
    try:
        app(standalone_mode=False)
    except WiseError as exc:
        if debug:
            raise
        console.error(str(exc), exc.hint)
        sys.exit(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        console.err.print("aborted")
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except TyperException as exc:  # bad usage: click's message, exit 2 like every CLI
        show = getattr(exc, "show", None)
        if show:
            show()
        sys.exit(getattr(exc, "exit_code", 2))
    except Exception as exc:  # an unexpected bug: still one line unless debugging
        if debug:
            raise
        console.error(f"internal error: {type(exc).__name__}: {exc}",
                      "this is a bug in wise; rerun with WISE_DEBUG=1 for the traceback and report it")
        sys.exit(INTERNAL_ERROR)
