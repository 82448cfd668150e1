"""wise generate: greedy text from a (patched) model, routing decided on the prompt."""
from __future__ import annotations

from typing import Annotated

import torch
import typer
from rich.text import Text

from ..session import open_model
from ..wise.router import route_names
from . import console
from .options import AllowPickle, Base, Device, DeviceMap, DType, Json, ModelArg


def generate(
    model: ModelArg,
    prompts: Annotated[list[str], typer.Argument(help="One or more prompts.")],
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Tokens to generate per prompt.")] = 20,
    base: Base = None,
    allow_pickle: AllowPickle = False,
    device: Device = "auto",
    dtype: DType = "auto",
    device_map: DeviceMap = None,
    json_out: Json = False,
) -> None:
    """Generate greedily from PROMPTS.

    Example:

      wise generate patched/ "The capital of Australia is"
    """
    sess = open_model(str(model), device=device, dtype=dtype, device_map=device_map,
                      progress=lambda m: console.status(m, json_out), base=base,
                      allow_pickle=allow_pickle)
    tok = sess.tokenizer
    enc = tok(prompts, return_tensors="pt", padding=True).to(sess.device)
    with torch.no_grad():
        out = sess.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                  pad_token_id=tok.pad_token_id)
    texts = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    route = sess.mem.held_route
    routes = route_names(route) if route is not None and sess.mem.n_memories else ["main"] * len(prompts)
    rows = [{"prompt": p, "completion": t, "memory": r} for p, t, r in zip(prompts, texts, routes)]
    if json_out:
        console.print_json("generate", {"model": str(model), "generations": rows})
        return
    for row in rows:
        console.out.print(Text(row["prompt"], style="bold") + Text(row["completion"]))
        console.err.print(f"[dim]  memory: {row['memory']}[/dim]")
