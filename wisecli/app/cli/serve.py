"""wise serve: an OpenAI-compatible HTTP server over a (patched) model."""
from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from wisecli.app.api import load
from wisecli.errors import WiseError
from wisecli.app.cli import console
from wisecli.app.cli.options import AllowPickle, Base, Device, DType, ModelArg


def serve(
    model: ModelArg,
    host: Annotated[str, typer.Option(help="Address to listen on (127.0.0.1: this machine only).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 8000,
    name: Annotated[Optional[str], typer.Option(help="The model id clients ask for (default: MODEL's last path part).")] = None,
    max_tokens: Annotated[int, typer.Option(min=1, help="Most tokens one request may generate.")] = 512,
    base: Base = None,
    allow_pickle: AllowPickle = False,
    device: Device = "auto",
    dtype: DType = "auto",
) -> None:
    """Serve MODEL over OpenAI's HTTP API: /v1/models, /v1/completions, /v1/chat/completions.

    Example:

      wise serve patched/ --port 8000     # then: OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="-")
    """
    import uvicorn

    from wisecli.app.serve import Engine, Worker, create_app
    loaded, tokenizer = load(model, device=device, dtype=dtype, base=base, allow_pickle=allow_pickle)
    served = name or Path(str(model)).name or str(model)
    worker = Worker()
    server = uvicorn.Server(uvicorn.Config(create_app(Engine(loaded, tokenizer, served, max_tokens, worker)),
                                           host=host, port=port, log_level="warning"))
    http = threading.Thread(target=server.run, name="http", daemon=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):  # a stop request ends the worker, then the server
        signal.signal(sig, lambda *_: stop.set())
    http.start()
    while not server.started and http.is_alive():
        time.sleep(0.05)
    if not server.started:
        raise WiseError(f"{host}:{port}: cannot listen there (the port is in use, or the address is not this machine's)")
    console.status(f"serving {served} at http://{host}:{port}/v1 (Ctrl-C or SIGTERM stops it)")
    threading.Thread(target=_watch, args=(http, stop), daemon=True).start()
    worker.run(stop)  # the model runs on the main thread (see wisecli/serve.py)
    server.should_exit = True
    http.join(timeout=30)


def _watch(http: threading.Thread, stop: threading.Event) -> None:
    """The server thread ending by itself (a port in use) ends the worker too."""
    http.join()
    stop.set()
