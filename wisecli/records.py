"""An edit as every layer sees it: a frozen record of text, read by ``app.edits`` from the
files users write and consumed by the editing methods."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass


@dataclass(frozen=True)
class EditRecord:
    """One knowledge edit; immutable so it can be shared between batches and the manifest."""

    id: str
    prompt: str
    target_new: str
    rephrase: tuple[str, ...] = ()
    locality_prompt: str | None = None
    locality_ground_truth: str | None = None
    subject: str | None = None
    ground_truth: str | None = None  # the old (true) answer, where the format gives it
    portability: tuple[tuple[str, str], ...] = ()  # (prompt, answer) pairs
    source: str | None = None  # "path:line" (JSONL) or "path:#index" (JSON list) for messages
    question: str | None = None  # the edit asked as a chat question (derived when absent)
    # Prompts about the subject with other relations, and their answer (None: the unedited
    # model's own), whose answers must not change.
    same_subject: tuple[tuple[str, str | None], ...] = ()


def default_id(prompt: str, target_new: str) -> str:
    """Content hash, so the same edit gets the same id in every file and every run."""
    return hashlib.sha256(f"{prompt}\u0000{target_new}".encode()).hexdigest()[:12]
