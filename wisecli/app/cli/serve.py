"""wise serve: an OpenAI-compatible HTTP server over a (patched) model."""
from __future__ import annotations

import signal
import sys
import threading
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from wisecli.app.cli import console
from wisecli.app.cli.options import AllowPickle, Base, Device, DType, ModelArg
from wisecli.app.session import open_model
from wisecli.errors import WiseError

SWITCH_INTERVAL = 0.0005  # seconds (benchmarks/serve_load.py: 16 clients 4.5-4.8x at 5 ms, 5.0-5.3x at 0.5 ms)


def serve(
    model: ModelArg,
    host: Annotated[str, typer.Option(help="Address to listen on (127.0.0.1: this machine only).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 8000,
    name: Annotated[Optional[str], typer.Option(help="The model id clients ask for (default: MODEL's last path part).")] = None,
    max_tokens: Annotated[int, typer.Option(min=1, help="Most tokens one request may generate.")] = 512,
    max_batch: Annotated[int, typer.Option(min=1, help="Most prompts generated together in one batch.")] = 16,
    max_queue: Annotated[int, typer.Option(min=1, help="Most prompts waiting for a batch; past it a request gets "
                                                        "503 with Retry-After.")] = 64,
    timeout: Annotated[float, typer.Option(min=1, help="Seconds a request may wait and run before it gets 504.")] = 600,
    base: Base = None,
    allow_pickle: AllowPickle = False,
    device: Device = "auto",
    dtype: DType = "auto",
) -> None:
    """Serve MODEL over OpenAI's HTTP API: /v1/models, /v1/completions, /v1/chat/completions,
    with /health and Prometheus /metrics.  Requests that arrive together are generated together.

    Example:

      wise serve patched/ --port 8000     # then: OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="-")
    """
    import uvicorn

    from wisecli.app.serve import Batcher, Engine, Stats, create_app
    sess = open_model(str(model), device=device, dtype=dtype, base=str(base) if base is not None else None,
                      allow_pickle=allow_pickle)
    served = name or Path(str(model)).name or str(model)
    stats = Stats()
    batcher = Batcher(sess.model, sess.tokenizer, sess.mem, stats, max_batch, max_queue)
    app = create_app(Engine(batcher, served, max_tokens, timeout, stats))
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
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
    # The worker hands the GIL back at every torch op; at Python's default 5 ms switch interval
    # it then waits behind the HTTP thread, which costs a tenth of the throughput under load.
    sys.setswitchinterval(SWITCH_INTERVAL)
    batcher.run(stop)  # the model runs on the main thread (see wisecli/app/serve/batcher.py)
    server.should_exit = True
    http.join(timeout=30)


def _watch(http: threading.Thread, stop: threading.Event) -> None:
    """The server thread ending by itself (a port in use) ends the worker too."""
    http.join()
    stop.set()
