"""wise edit: train edits into a side memory and write a patched checkpoint."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from wisecli.app.pipeline import EditOptions, edit as run_edit
from wisecli.app.report import eval_table, summary_table
from wisecli.app.cli import console
from wisecli.app.cli.options import AllowPickle, Base, Device, DeviceMap, DType, Json, Mode, ModelArg


def edit(
    model: ModelArg,
    output: Annotated[Path, typer.Option("-o", "--output", show_default=False, help="Directory for the patched checkpoint.")],
    edits: Annotated[Optional[Path], typer.Argument(show_default=False, help="(MODEL may be omitted: the default model is used.) Edits: JSONL (prompt, target_new, ...) or an EasyEdit/MEND/KnowEdit JSON file.")] = None,
    method: Annotated[Optional[str], typer.Option(help="wise (a routed side memory) or ultraedit (closed-form shifts written into plain weights). Default: wise, or the checkpoint's.")] = None,
    mode: Annotated[Optional[Mode], typer.Option(help="merge (one side memory) or retrieve (several, top-1 routing). Default: merge, or the checkpoint's.")] = None,
    config: Annotated[Optional[Path], typer.Option("--config", help="YAML file of the method's hyper-parameters (keys of WiseConfig or UltraEditConfig).")] = None,
    layer: Annotated[Optional[list[int]], typer.Option(metavar="N", help="wise: the decoder block whose FFN output projection gets the side memory (default ≈ 0.8 × depth); ultraedit: repeat for each block to edit.")] = None,
    module_path: Annotated[Optional[str], typer.Option(help="Dotted path of the FFN output projection, for architectures wise does not know.")] = None,
    negatives: Annotated[Optional[Path], typer.Option(help="Irrelevant prompts for the router (txt, JSONL, or an edit file's locality prompts). Default: text the model writes itself.")] = None,
    seed: Annotated[Optional[int], typer.Option(min=0, max=2 ** 32 - 1, help="Seed for prefixes, negatives and shard masks.")] = None,
    patch_only: Annotated[bool, typer.Option("--patch-only", help="Write only the wise files and a hash-checked reference to the base.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace OUTPUT if it exists.")] = False,
    no_eval: Annotated[bool, typer.Option("--no-eval", help="Skip measuring the edits after training.")] = False,
    base: Base = None,
    allow_pickle: AllowPickle = False,
    device: Device = "auto",
    dtype: DType = "auto",
    device_map: DeviceMap = None,
    json_out: Json = False,
) -> None:
    """Apply EDITS to MODEL and write the patched checkpoint to OUTPUT.

    Examples:

      wise edit smollm2-135m examples/edits.jsonl -o patched/

      wise edit patched/ next-month.jsonl -o patched-v2/     # lifelong: earlier edits stay
    """
    if edits is None:  # `wise edit EDITS -o OUT`: the default model
        model, edits = "default", Path(model)
    options = EditOptions(method=method, mode=mode.value if mode else None, config_file=str(config) if config else None,
                          layer=None if not layer else layer[0] if len(layer) == 1 else tuple(layer), module_path=module_path, negatives=str(negatives) if negatives else None,
                          seed=seed, patch_only=patch_only, force=force, evaluate=not no_eval,
                          device=device, dtype=dtype, device_map=device_map, base=base,
                          allow_pickle=allow_pickle)
    run = run_edit(model, edits, output, options, console.ConsoleReporter(json_out))
    summary = run.summary()
    if json_out:
        console.print_json("edit", summary)
        return
    if run.report:
        console.out.print(eval_table(run.report, title=f"edits applied to {run.session.origin}"))
    console.out.print(summary_table("wise edit", {k: v for k, v in summary.items() if k != "metrics"}))
