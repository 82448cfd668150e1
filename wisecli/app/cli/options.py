"""Option types shared by every command, defined once."""
from __future__ import annotations

from enum import Enum
from typing import Annotated, Optional

import typer


class Mode(str, Enum):
    """merge: one side memory that shards merge into; retrieve: several, top-1 routing."""

    merge = "merge"
    retrieve = "retrieve"


ModelArg = Annotated[str, typer.Argument(
    help="Alias (smollm2-135m, gemma3-270m, or 'default'), Hugging Face checkpoint dir, "
         ".gguf file, or a directory written by wise.")]
Device = Annotated[str, typer.Option(help="auto (CUDA when available), cpu, cuda or cuda:N.")]
DType = Annotated[str, typer.Option(help="auto (float32 on CPU, bfloat16 on GPU), float32, bfloat16, float16.")]
DeviceMap = Annotated[Optional[str], typer.Option(
    "--device-map", help="'auto' spreads a model too large for one GPU over all GPUs (accelerate).")]
Base = Annotated[Optional[str], typer.Option(
    "--base", help="Where a --patch-only checkpoint's base is (a directory or an alias), when it is not at "
                   "the recorded path; checked against the recorded SHA-256.")]
AllowPickle = Annotated[bool, typer.Option(
    "--allow-pickle", help="Also load weights stored as pickles (*.bin); unpickling can run code: only for files you trust.")]
Json = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout; no progress bars.")]
