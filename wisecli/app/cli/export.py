"""wise export: a patched model as a plain checkpoint or a GGUF (a side memory folded in)."""
from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from wisecli import __version__
from wisecli.app.edits import load_edits
from wisecli.app.export import check_output, folding_cost, gguf_source, memory_to_fold, write_gguf, write_merged
from wisecli.app.report import summary_table
from wisecli.app.session import open_model
from wisecli.app.cli import console
from wisecli.app.cli.options import AllowPickle, Base, Device, DType, Json, ModelArg


class Target(str, Enum):
    merged = "merged"
    gguf = "gguf"


def export(
    model: ModelArg,
    to: Annotated[Target, typer.Option("--to", help="merged: a plain Hugging Face checkpoint; gguf: a GGUF file.")],
    output: Annotated[Path, typer.Option("-o", "--output", show_default=False, help="Directory (merged) or .gguf file to write.")],
    memory: Annotated[Optional[int], typer.Option(help="Which side memory to fold, when the checkpoint holds several.")] = None,
    edits: Annotated[Optional[Path], typer.Option(help="The edit file, so folding's cost on its locality prompts is measured too.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace OUTPUT if an earlier export wrote it.")] = False,
    base: Base = None,
    allow_pickle: AllowPickle = False,
    device: Device = "auto",
    dtype: DType = "float32",
    json_out: Json = False,
) -> None:
    """Fold MODEL's side memory into its weights, for serving stacks that cannot run the router
    (an ultraedit checkpoint's weights are edited already: it is written as it is).

    Every prompt then goes through the memory: the edits hold, and what it changes elsewhere is
    measured and printed (routed before, folded after).

    Examples:

      wise export patched/ --to merged -o folded/

      wise export patched/ --to gguf -o patched.gguf --edits examples/edits.jsonl
    """
    check_output(output, force, gguf=to is Target.gguf)
    records = load_edits(edits) if edits else []
    sess = open_model(str(model), device=device, dtype=dtype, base=base, allow_pickle=allow_pickle,
                      progress=lambda m: console.status(m, json_out))
    k = memory_to_fold(sess, memory)
    source = gguf_source(sess) if to is Target.gguf else None  # before the measuring, which takes a while
    applied = [(e["prompt"], e["target_new"]) for e in sess.manifest["edits"] if e.get("memory") == k or k is None]
    console.status(f"measuring routed vs folded on {len(applied)} edits and fixed unrelated prompts", json_out)
    cost = folding_cost(sess, k, applied, [r.locality_prompt for r in records if r.locality_prompt])
    provenance = {"exported_by": f"wise {__version__}", "from": str(model), "memory": k, "folding_cost": cost}
    written = write_gguf(sess, output, source) if source else write_merged(sess, output, provenance)
    result = {"output": str(written), "to": to.value, "memory": k, "folding_cost": cost}
    if json_out:
        console.print_json("export", result)
        return
    rows = {f"{g} ({c['n']}, {c['measure']})": f"routed {_f(c['routed'])} → folded {_f(c['folded'])}"
            for g, c in cost.items() if isinstance(c, dict)}
    console.out.print(summary_table(f"wise export → {written}", {**rows, "unrelated prompts changed when folded":
                                                                 "; ".join(cost["changed_when_folded"]) or "none"}))


def _f(x: float | None) -> str:
    return "—" if x is None else f"{x:.3f}"
