"""wise bench: seconds per edit, cost in forward passes, inference overhead, peak memory."""
from __future__ import annotations

import platform
from typing import Annotated, Optional

import torch
import typer
from transformers import AutoTokenizer

from wisecli.app.bench.run import measure_editing, measure_inference
from wisecli.app.bench.synthetic import SHAPES, synthetic_edits, synthetic_model
from wisecli.methods.wise.config import load_config
from wisecli.errors import WiseError
from wisecli.methods.locate import get_module, locate_ffn_out
from wisecli.app.models import pick_device, pick_dtype, resolve_base
from wisecli.app.report import summary_table
from wisecli.app.session import Session, open_model
from wisecli.methods.wise.method import attach
from wisecli.app.cli import console
from wisecli.app.cli.options import AllowPickle, Base, Device, DType, Json, Mode


def bench(
    model: Annotated[str, typer.Argument(help="Model to measure (as for wise edit); ignored with --synthetic.")] = "default",
    edits: Annotated[int, typer.Option("--edits", min=1, help="Edits to apply.")] = 20,
    batch: Annotated[int, typer.Option("--batch", min=1, help="Edits trained together (one shard).")] = 10,
    mode: Annotated[Mode, typer.Option(help="merge or retrieve.")] = Mode.merge,
    synthetic: Annotated[Optional[str], typer.Option(help=f"Random weights of a real shape, built on the device: {', '.join(SHAPES)}.")] = None,
    compare_reference: Annotated[bool, typer.Option("--compare-reference", help="Also time the plain full-forward loop on the first batch.")] = False,
    config: Annotated[Optional[str], typer.Option("--config", help="YAML hyper-parameters, as for wise edit.")] = None,
    reps: Annotated[int, typer.Option(min=1, help="Interleaved repetitions for inference timing.")] = 5,
    base: Base = None,
    allow_pickle: AllowPickle = False,
    device: Device = "auto",
    dtype: DType = "auto",
    json_out: Json = False,
) -> None:
    """Measure editing speed, memory and inference overhead in one run.

    Examples:

      wise bench smollm2-135m --edits 20 --batch 10 --compare-reference

      wise bench --synthetic llama-2-7b --device cuda --dtype bfloat16 --batch 16 --json
    """
    mode_name = mode.value
    say = lambda m: console.status(m, json_out)  # noqa: E731
    if config:  # its errors before the model loads
        load_config(config, None)
    sess = _synthetic_session(synthetic, device, dtype) if synthetic else \
        open_model(model, device=device, dtype=dtype, progress=say, base=base, allow_pickle=allow_pickle)
    records = synthetic_edits(edits)
    say(f"benchmarking {synthetic or model} on {sess.device} ({str(sess.dtype).replace('torch.', '')})")
    result = {"model": synthetic or model, "synthetic": bool(synthetic), "device": str(sess.device),
              "device_name": torch.cuda.get_device_name(sess.device) if sess.device.type == "cuda" else platform.processor() or platform.machine(),
              "dtype": str(sess.dtype).replace("torch.", ""), "threads": torch.get_num_threads(),
              "mode": mode_name, "edits": edits, "batch": batch, "module": sess.target.module_path}
    result.update(measure_editing(sess, records, batch, mode_name, compare_reference, say, config))
    say("timing inference: base vs patched, interleaved")
    result.update(measure_inference(sess, [r.prompt for r in records[:8]], reps))
    result["edit_cost_forward_equivalents"] = round(result["seconds_per_edit"] / result["forward_seconds"], 1)
    if synthetic:
        result["note"] = "random weights: speed and memory figures only; quality numbers mean nothing"
    if json_out:
        console.print_json("bench", result)
        return
    console.out.print(summary_table(f"wise bench {synthetic or model}", result))


def _synthetic_session(name: str, device: str, dtype: str) -> Session:
    """A random model of a real shape, with the default model's tokenizer."""
    if name not in SHAPES:  # before the tokenizer loads
        raise WiseError(f"unknown --synthetic shape '{name}'", hint=f"choose from {', '.join(SHAPES)}")
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    tok = AutoTokenizer.from_pretrained(resolve_base("default"), trust_remote_code=False)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = synthetic_model(name, dev, dt, min_vocab=len(tok))
    target = locate_ffn_out(model)
    mem = attach(model, target, tok)
    return Session(model, tok, mem, target, get_module(model, target.layers_path), None, name, None,
                   dev, dt, 0.0)
