"""wise eval: reliability, generalization, locality and generated accuracy, with CI gates."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from wisecli.app.edits import load_edits, load_prompts
from wisecli.errors import GateFailed
from wisecli.app.metrics import evaluate, failed_gates
from wisecli.app.report import eval_markdown, eval_table, use_table, use_totals
from wisecli.app.session import open_model
from wisecli.app.cli import console
from wisecli.app.cli.options import AllowPickle, Base, Device, DeviceMap, DType, Json, ModelArg

Gate = Annotated[Optional[float], typer.Option(min=0.0, max=1.0, help="Exit 3 when the figure is below this.")]
Ceiling = Annotated[Optional[float], typer.Option(min=0.0, max=1.0, help="Exit 3 when the figure is above this.")]


def eval_cmd(
    model: ModelArg,
    edits: Annotated[Optional[Path], typer.Argument(show_default=False, help="(MODEL may be omitted: the default model is used.) Edits to measure (same formats as wise edit).")] = None,
    locality: Annotated[Optional[Path], typer.Option(help="Extra prompts whose answers must not change (txt/JSONL/edit file).")] = None,
    markdown: Annotated[bool, typer.Option("--markdown", help="Print a Markdown table instead of the rich table.")] = False,
    no_generate: Annotated[bool, typer.Option("--no-generate", help="Skip greedy generation (teacher-forced metrics only; no use measurements).")] = False,
    batch_size: Annotated[int, typer.Option(min=1, help="Prompts per forward pass.")] = 16,
    min_reliability: Gate = None,
    min_generalization: Gate = None,
    min_locality: Gate = None,
    min_chat: Annotated[Optional[float], typer.Option(min=0.0, max=1.0, help="Exit 3 when chat accuracy is below this (n/a without a chat template passes).")] = None,
    min_same_subject: Gate = None,
    min_same_subject_chat: Annotated[Optional[float], typer.Option(min=0.0, max=1.0, help="Exit 3 when same-subject chat (other relations asked in chat, reply unchanged) is below this (n/a without a chat template passes).")] = None,
    max_repetition: Ceiling = None,
    max_leakage: Ceiling = None,
    base: Base = None,
    allow_pickle: AllowPickle = False,
    device: Device = "auto",
    dtype: DType = "auto",
    device_map: DeviceMap = None,
    json_out: Json = False,
) -> None:
    """Measure how well MODEL knows EDITS, and that it kept everything else: teacher-forced
    reliability, generalization and locality, greedy generation, and where the model is used
    (chat questions, 40-token continuations, the subject's other facts).

    Examples:

      wise eval patched/ examples/edits.jsonl

      wise eval patched/ edits.jsonl --json --min-reliability 0.9 --min-locality 0.95 --max-repetition 0.1
    """
    if edits is None:  # `wise eval EDITS`: the default model
        model, edits = "default", Path(model)
    records = load_edits(edits)
    extra = [(p, None) for p in load_prompts(locality)] if locality else None
    sess = open_model(str(model), device=device, dtype=dtype, device_map=device_map,
                      progress=lambda m: console.status(m, json_out), base=base, allow_pickle=allow_pickle)
    mem = sess.mem if sess.manifest is not None else None
    with console.progress_bar("evaluating", len(records), json_out) as bar:
        report = evaluate(sess.model, sess.tokenizer, mem, records, extra_locality=extra,
                          batch_size=batch_size, generate=not no_generate,
                          progress=(lambda d, t: bar(d * len(records) // max(t, 1))) if bar else None)
    failed = failed_gates(report, {"reliability": min_reliability, "generalization": min_generalization,
                                   "locality": min_locality, "chat_accuracy": min_chat,
                                   "same_subject_locality": min_same_subject,
                                   "same_subject_chat": min_same_subject_chat},
                          {"repetition": max_repetition, "leakage": max_leakage})
    result = {**report.to_dict(), "gates": {"passed": not failed, "failed": failed}}
    if json_out:
        console.print_json("eval", result)
    elif markdown:
        console.out.print(eval_markdown(report), markup=False, highlight=False)
    else:
        console.out.print(eval_table(report, title=f"wise eval {model}"))
        if any(e.use is not None for e in report.edits):
            console.out.print(use_table(report))
            console.out.print(use_totals(report))
    if failed:
        raise GateFailed(_gate_message(failed))


def _gate_message(failed: list[dict]) -> str:
    f = failed[0]
    side, bound = ("below", "min") if "min" in f else ("above", "max")
    option = {"chat_accuracy": "chat", "same_subject_locality": "same-subject",
              "same_subject_chat": "same-subject-chat"}.get(f["metric"], f["metric"])
    value = f["value"] if f["value"] is None else round(f["value"], 4)
    more = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
    return f"{f['metric']} {value} is {side} --{bound}-{option} {f[bound]}{more}"
