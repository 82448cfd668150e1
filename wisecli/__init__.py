"""wise: lifelong knowledge edits for LLM checkpoints."""

__version__ = "0.1.0"
