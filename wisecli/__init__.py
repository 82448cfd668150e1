"""wise: lifelong knowledge edits for LLM checkpoints."""

__version__ = "0.2.0"
