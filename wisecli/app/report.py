"""Rendering of evaluation reports and summaries: rich tables for the terminal, Markdown for files.

Rendering only — no model code — so the CLI can print a report it loaded from JSON as well as
one it just computed.  Text from the model or the user goes in as ``rich.text.Text``, never as
markup, so a generated "[bold]" prints as written.
"""
from __future__ import annotations

import math
from typing import Any

from rich.table import Table
from rich.text import Text

from wisecli.app.metrics import EvalReport, EditResult

MISSING = "—"
TEXT_WIDTH = 40  # generated text is cut to this many characters in tables


def fmt(x: float | None) -> str:
    """A metric as three decimals, or a dash where there is no data (never a misleading 0)."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return MISSING
    return f"{x:.3f}"


def _mark(x: float | None) -> str:
    return MISSING if x is None else ("✓" if x >= 1.0 else "✗")


def _routed(r: bool | None) -> str:
    return MISSING if r is None else ("side" if r else "main")


def _cut(text: str, width: int = TEXT_WIDTH) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def _has(report: EvalReport, attr: str) -> bool:
    return any(getattr(e, attr) is not None for e in report.edits)


def _columns(report: EvalReport) -> list[tuple[str, str]]:
    """(header, EditResult field) of the metric columns; portability/routing only where present."""
    cols = [("rel", "reliability"), ("gen", "generalization"), ("loc", "locality")]
    if report.portability is not None:
        cols.append(("port", "portability"))
    return cols


def _edit_cells(e: EditResult, cols: list[tuple[str, str]], routed: bool) -> list[str]:
    cells = [fmt(getattr(e, f)) for _, f in cols] + [_mark(e.generated)]
    return cells + ([_routed(e.routed)] if routed else [])


def eval_table(report: EvalReport, title: str = "wise eval", per_edit: bool = True) -> Table:
    """Per-edit rows then a bold total row; "—" where a metric has no data."""
    cols, routed = _columns(report), _has(report, "routed")
    table = Table(title=title, title_justify="left")
    table.add_column("id", overflow="fold")
    for header, _ in cols:
        table.add_column(header, justify="right")
    table.add_column("gen-acc", justify="center")
    if routed:
        table.add_column("route", justify="center")
    table.add_column("generated", overflow="ellipsis", no_wrap=True)
    if per_edit:
        for e in report.edits:
            table.add_row(Text(e.id), *_edit_cells(e, cols, routed), Text(_cut(e.generated_text)))
        if report.edits:
            table.add_section()
    totals = [fmt(getattr(report, f)) for _, f in cols] + [fmt(report.generated_accuracy)]
    n_routed = sum(bool(e.routed) for e in report.edits)
    table.add_row(f"total ({report.n_edits})", *totals,
                  *([f"{n_routed}/{report.n_edits}"] if routed else []),
                  f"{report.seconds:.1f}s", style="bold")
    return table


USE_ROWS = (("chat accuracy", "chat_accuracy"), ("  under a system prompt", "chat_accuracy_system"),
            ("  after an earlier turn", "chat_accuracy_turn"), ("  sampled (temperature 0.7)", "chat_accuracy_sampled"),
            ("repetition (target 3+ times in 40 tokens)", "repetition"),
            ("leakage (another edit's target)", "leakage"), ("generation entropy", "generation_entropy"),
            ("same-subject locality", "same_subject_locality"),
            ("same-subject chat (reply unchanged)", "same_subject_chat"))


def use_table(report: EvalReport, title: str = "where the model is used") -> Table:
    """The use measurements in total, and each edit's chat reply and continuation."""
    table = Table(title=title, title_justify="left")
    for name in ("id", "chat", "reply", "rep", "leaks", "same-subj", "ss-chat", "continuation"):
        table.add_column(name, overflow="ellipsis", no_wrap=name in ("reply", "continuation"))
    for e in report.edits:
        u = e.use
        if u is None:
            continue
        table.add_row(Text(e.id), _mark(None if u.chat_correct is None else float(u.chat_correct)),
                      Text(_cut(u.chat_reply or MISSING)), str(u.repeats), Text(", ".join(u.leaked) or MISSING),
                      fmt(u.same_subject), fmt(u.same_subject_chat), Text(_cut(u.continuation)))
    return table


def use_totals(report: EvalReport) -> Table:
    return summary_table(f"use, in total ({report.n_edits} edits)",
                         {name: _total(getattr(report, key)) for name, key in USE_ROWS})


def _total(x: float | None) -> str:
    return "n/a" if x is None else (f"{x:.2f}" if x > 1 else f"{x:.3f}")


def _md(text: str) -> str:
    """Escape what would break a Markdown table cell."""
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def eval_markdown(report: EvalReport) -> str:
    """Totals table, then one row per edit; for files, PR comments and papers' appendices."""
    lines = ["| metric | value |", "|---|---|", f"| edits | {report.n_edits} |"]
    for name, value in [("reliability", report.reliability), ("generalization", report.generalization),
                        ("locality", report.locality), ("generated accuracy", report.generated_accuracy),
                        ("portability", report.portability)]:
        lines.append(f"| {name} | {fmt(value)} |")
    if report.perplexity is not None:
        lines.append(f"| target perplexity | {report.perplexity:.3f} |")
    for name, key in USE_ROWS:
        if any(e.use is not None for e in report.edits):
            lines.append(f"| {name} | {_total(getattr(report, key))} |")
    lines.append(f"| seconds | {report.seconds:.1f} |")
    if report.edits:
        cols, routed = _columns(report), _has(report, "routed")
        head = ["id"] + [h for h, _ in cols] + ["gen-acc"] + (["route"] if routed else []) + ["generated"]
        lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for e in report.edits:
            cells = [_md(e.id)] + _edit_cells(e, cols, routed) + [_md(_cut(e.generated_text, 60))]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _value(v: Any) -> str:
    if v is None:
        return MISSING
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return fmt(v) if 0.0 <= v <= 1.0 else f"{v:,.3f}".rstrip("0").rstrip(".")
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, (list, tuple)):
        return ", ".join(_value(x) for x in v) or MISSING
    return str(v)


def summary_table(title: str, rows: dict[str, Any]) -> Table:
    """Two columns, key and value, for ``wise info`` and the summary after ``wise edit``."""
    table = Table(title=title, title_justify="left", show_header=False)
    table.add_column("key", style="bold")
    table.add_column("value", overflow="fold")
    for key, value in rows.items():
        table.add_row(Text(str(key)), Text(_value(value)))
    return table
