"""wise generate: greedy text from a (patched) model, routing decided on the prompt."""
from __future__ import annotations

from typing import Annotated

import torch
import typer

from wisecli import methods
from rich.text import Text

from wisecli.errors import WiseError
from wisecli.app.session import open_model
from wisecli.runtime.gates import route_names
from wisecli.app.cli import console
from wisecli.app.cli.options import AllowPickle, Base, Device, DeviceMap, DType, Json, ModelArg


def generate(
    model: ModelArg,
    prompts: Annotated[list[str], typer.Argument(help="One or more prompts.")],
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Tokens to generate per prompt.")] = 20,
    chat: Annotated[bool, typer.Option("--chat", help="Ask each prompt as a user's message through the model's chat template.")] = False,
    base: Base = None,
    allow_pickle: AllowPickle = False,
    device: Device = "auto",
    dtype: DType = "auto",
    device_map: DeviceMap = None,
    json_out: Json = False,
) -> None:
    """Generate greedily from PROMPTS.

    Examples:

      wise generate patched/ "The capital of Australia is"

      wise generate patched/ --chat "What is the capital of Australia?" --max-new-tokens 40
    """
    sess = open_model(str(model), device=device, dtype=dtype, device_map=device_map,
                      progress=lambda m: console.status(m, json_out), base=base,
                      allow_pickle=allow_pickle)
    tok = sess.tokenizer
    if chat and not getattr(tok, "chat_template", None):
        raise WiseError(f"{model}: its tokenizer has no chat template; drop --chat")
    texts_in = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
                for p in prompts] if chat else prompts
    enc = tok(texts_in, return_tensors="pt", padding=True, add_special_tokens=not chat).to(sess.device)
    with torch.no_grad():
        out = sess.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                  pad_token_id=tok.pad_token_id)
    texts = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    route = sess.mem.answered_route
    unrouted = "weights" if methods.get(sess.method).plain and sess.mem.n_memories else "main"
    routes = route_names(route) if route is not None and sess.mem.n_memories else [unrouted] * len(prompts)
    rows = [{"prompt": p, "completion": t, "memory": r} for p, t, r in zip(prompts, texts, routes)]
    if json_out:
        console.print_json("generate", {"model": str(model), "generations": rows})
        return
    for row in rows:
        console.out.print(Text(row["prompt"], style="bold") + Text(("\n" if chat else "") + row["completion"]))
        console.err.print(f"[dim]  memory: {row['memory']}[/dim]")
