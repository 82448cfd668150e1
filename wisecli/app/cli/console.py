"""Where output goes: results to stdout, progress and warnings to stderr."""
from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from typing import Any, Iterator

from rich.console import Console
from rich.markup import escape
from rich.text import Text
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

out = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, soft_wrap=True)  # one line per message, whatever the width


# The --json outputs' shared top level: which output it is, in which layout, from which wise.
# A change that removes or renames a key bumps JSON_LAYOUT; adding keys does not.
JSON_LAYOUT = 1


def print_json(kind: str, obj: dict[str, Any]) -> None:
    from wisecli import __version__
    head = {"schema": f"wise/{kind}/{JSON_LAYOUT}", "wise_version": __version__}
    sys.stdout.write(json.dumps({**head, **obj}, indent=2, default=str) + "\n")
    sys.stdout.flush()


def status(message: str, quiet: bool = False) -> None:
    if not quiet:
        err.print(f"[dim]{escape(message)}[/dim]", highlight=False)


@contextmanager
def progress_bar(description: str, total: int, quiet: bool) -> Iterator[Any]:
    """A rich bar on stderr, or a no-op when --json (machines read stdout only)."""
    if quiet:
        yield None
        return
    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("eta"),
                   TimeRemainingColumn(), console=err, transient=False)
    with bar:
        task = bar.add_task(description, total=total, info="")
        yield lambda completed=None, info="": bar.update(
            task, **({"completed": completed} if completed is not None else {}), info=info)


class ConsoleReporter:
    """The pipeline's status lines and progress bars, on stderr; silent under --json."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet

    def status(self, message: str) -> None:
        status(message, self.quiet)

    @contextmanager
    def phase(self, name: str, total: int) -> Iterator[Any]:
        with progress_bar(name, total, self.quiet) as bar:
            yield (lambda done, note="": bar(done, note)) if bar else (lambda done, note="": None)


def error(message: str, hint: str | None = None) -> None:
    """One error line (and a hint) on stderr, as plain text styled by rich, never parsed as
    markup: a message may contain brackets."""
    err.print(Text("error: ", style="red") + Text(message), highlight=False)
    if hint:
        err.print(Text(f"hint: {hint}", style="dim"), highlight=False)
