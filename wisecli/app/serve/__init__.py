"""``wise serve``: OpenAI's HTTP API over a (patched) model, batching concurrent requests.

``http`` answers requests, ``jobs`` carries each one from admission to its answer,
``batcher`` runs the model on one worker in padded batches, ``rows`` is one prompt's
generation inside a batch, ``stats`` is what ``/metrics`` reports.
"""
from wisecli.app.serve.batcher import Batcher
from wisecli.app.serve.http import create_app
from wisecli.app.serve.jobs import Engine
from wisecli.app.serve.stats import Stats

__all__ = ["Batcher", "Engine", "Stats", "create_app"]
