"""wise info: what a patched checkpoint holds, read from its manifest alone."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from wisecli.errors import CheckpointError
from wisecli.app.report import summary_table
from wisecli.app.session import read_patched
from wisecli.app.cli import console
from wisecli.app.cli.options import Base, Json


def info(
    model: Annotated[Path, typer.Argument(help="A directory written by wise edit.")],
    verify: Annotated[bool, typer.Option(help="Check the base weights' SHA-256 against the manifest.")] = True,
    base: Base = None,
    json_out: Json = False,
) -> None:
    """Show base, layer, mode, edits applied, settings and stored metrics.

    Example:

      wise info patched/ --json
    """
    if not (model / "wise.json").is_file():
        raise CheckpointError(f"{model}: not a patched checkpoint (no wise.json)",
                              hint="wise info reads directories written by wise edit")
    ckpt = read_patched(model, base, verify=verify)
    m = ckpt.manifest
    metrics = {k: v for k, v in (m.get("metrics") or {}).items() if k != "edits"}
    state = _state_size(model, len(m["edits"]))
    if json_out:
        console.print_json("info", {**m, "metrics": metrics, "base_dir": str(ckpt.base_dir), "verified": verify,
                                    **state})
        return
    t, r = m["target"], m["router"]
    console.out.print(summary_table(f"wise info {model}", {
        "base": m["base"].get("origin"), "base dir": str(ckpt.base_dir),
        "base embedded": m["base"].get("embedded"), "model type": m["base"].get("model_type"),
        "method": m["method"], **_where(t),
        "mode": m["mode"], "edits applied": len(m["edits"]), "runs": len(m.get("runs", [])),
        "state": f"{state['state_bytes'] / 2**20:.1f} MiB ({state['state_bytes_per_edit'] / 1024:.1f} KiB per edit)",
        **{k.replace("_", " "): ([round(x, 4) for x in v] if isinstance(v, list) else v) for k, v in r.items()},
        "tool version": m["tool"]["version"], "format version": m["format_version"],
        **{f"metric {k}": (round(v, 4) if isinstance(v, float) else v) for k, v in metrics.items()},
    }))
    console.out.print(summary_table("settings", m["config"]))


def _where(target: dict) -> dict[str, str]:
    """The edited module and its layer (wise), or every edited layer (plain weights)."""
    if "module_path" in target:
        return {"module": target["module_path"], "layer": f"{target['layer']} of {target['n_layers']}"}
    return {"modules": f"{len(target['modules'])}: " + ", ".join(target["modules"]),
            "layers": f"{', '.join(map(str, target['layers']))} of {target['n_layers']}"}


def _state_size(model: Path, n_edits: int) -> dict[str, int]:
    """What the edits cost beside the base: ``wise.safetensors`` (side memories and router, or
    shifts and statistics), the figure that grows, or not, as edits pile up."""
    size = (model / "wise.safetensors").stat().st_size
    return {"state_bytes": size, "state_bytes_per_edit": size // max(n_edits, 1)}
