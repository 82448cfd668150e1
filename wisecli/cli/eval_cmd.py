"""wise eval: reliability, generalization, locality and generated accuracy, with CI gates."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..edits import load_edits, load_prompts
from ..errors import GateFailed
from ..metrics import evaluate
from ..report import eval_markdown, eval_table
from ..session import open_model
from . import console
from .options import AllowPickle, Base, Device, DeviceMap, DType, Json, ModelArg

Gate = Annotated[Optional[float], typer.Option(min=0.0, max=1.0, help="Exit 3 when the figure is below this.")]


def eval_cmd(
    model: ModelArg,
    edits: Annotated[Optional[Path], typer.Argument(show_default=False, help="(MODEL may be omitted: the default model is used.) Edits to measure (same formats as wise edit).")] = None,
    locality: Annotated[Optional[Path], typer.Option(help="Extra prompts whose answers must not change (txt/JSONL/edit file).")] = None,
    markdown: Annotated[bool, typer.Option("--markdown", help="Print a Markdown table instead of the rich table.")] = False,
    no_generate: Annotated[bool, typer.Option("--no-generate", help="Skip greedy generation (teacher-forced metrics only).")] = False,
    batch_size: Annotated[int, typer.Option(min=1, help="Prompts per forward pass.")] = 16,
    min_reliability: Gate = None,
    min_generalization: Gate = None,
    min_locality: Gate = None,
    base: Base = None,
    allow_pickle: AllowPickle = False,
    device: Device = "auto",
    dtype: DType = "auto",
    device_map: DeviceMap = None,
    json_out: Json = False,
) -> None:
    """Measure how well MODEL knows EDITS (and that it kept everything else).

    Examples:

      wise eval patched/ examples/edits.jsonl

      wise eval patched/ edits.jsonl --json --min-reliability 0.9 --min-locality 0.95
    """
    if edits is None:  # `wise eval EDITS`: the default model
        model, edits = "default", Path(model)
    records = load_edits(edits)
    extra = [(p, None) for p in load_prompts(locality)] if locality else None
    sess = open_model(str(model), device=device, dtype=dtype, device_map=device_map,
                      progress=lambda m: console.status(m, json_out), base=base,
                      allow_pickle=allow_pickle)
    mem = sess.mem if sess.manifest is not None else None
    with console.progress_bar("evaluating", len(records), json_out) as bar:
        report = evaluate(sess.model, sess.tokenizer, mem, records, extra_locality=extra,
                          batch_size=batch_size, generate=not no_generate,
                          progress=(lambda d, t: bar(d * len(records) // max(t, 1))) if bar else None)
    result = report.to_dict()
    failed = [(name, result[name], gate) for name, gate in
              (("reliability", min_reliability), ("generalization", min_generalization),
               ("locality", min_locality))
              if gate is not None and (result[name] is None or result[name] < gate)]
    result["gates"] = {"passed": not failed,
                       "failed": [{"metric": n, "value": v, "min": g} for n, v, g in failed]}
    if json_out:
        console.print_json("eval", result)
    elif markdown:
        console.out.print(eval_markdown(report), markup=False, highlight=False)
    else:
        console.out.print(eval_table(report, title=f"wise eval {model}"))
    if failed:
        n, v, g = failed[0]
        raise GateFailed(f"{n} {v if v is None else round(v, 4)} is below --min-{n} {g}"
                         + (f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""))
