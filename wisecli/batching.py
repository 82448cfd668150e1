"""Token batches of (query, answer) pairs, shared by training and evaluation.

Rows are padded on the left so that every row's last answer token sits at the
last position: the logits that score answers are then the last few positions
of every row, and the model only needs to compute those (``logits_to_keep``),
which saves most of the LM-head cost on a large vocabulary.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Batch:
    input_ids: torch.Tensor       # (B, T)
    attention_mask: torch.Tensor  # (B, T), 1 on real tokens
    position_ids: torch.Tensor    # (B, T), counted from each row's first real token
    labels: torch.Tensor          # (B, T), answer tokens, -100 elsewhere
    query_mask: torch.Tensor      # (B, T), 1 on the query's tokens: what the router looks at
    answer_len: int               # longest answer, in tokens

    def to(self, device: torch.device) -> "Batch":
        return Batch(self.input_ids.to(device), self.attention_mask.to(device),
                     self.position_ids.to(device), self.labels.to(device),
                     self.query_mask.to(device), self.answer_len)

    def rows(self, idx: torch.Tensor) -> "Batch":
        return Batch(self.input_ids[idx], self.attention_mask[idx], self.position_ids[idx],
                     self.labels[idx], self.query_mask[idx], self.answer_len)

    def last_cols(self, width: int) -> "Batch":
        """Keep the last ``width`` positions: with left padding, dropping columns that
        are padding in every row changes no result and saves their compute."""
        w = min(width, self.input_ids.shape[1])
        return Batch(self.input_ids[:, -w:], self.attention_mask[:, -w:], self.position_ids[:, -w:],
                     self.labels[:, -w:], self.query_mask[:, -w:], self.answer_len)

    @property
    def logits_to_keep(self) -> int:
        """Positions whose logits score an answer token (one before each answer token)."""
        return min(self.input_ids.shape[1], self.answer_len + 1)

    def kept_labels(self) -> torch.Tensor:
        return self.labels[:, -self.logits_to_keep:]


def encode_answer(tokenizer, answer: str) -> list[int]:
    """Answer tokens as they follow a prompt: with the separating space, no BOS."""
    return tokenizer(" " + answer.strip(), add_special_tokens=False)["input_ids"]


def encode_query(tokenizer, query: str, templated: bool = False) -> list[int]:
    """A prompt's tokens.  A chat-templated prompt is taken as it is (its special tokens and
    the newline after the assistant header are the template's), a plain one stripped."""
    if templated:
        return tokenizer(query, add_special_tokens=False)["input_ids"]
    return tokenizer(query.rstrip())["input_ids"]


def encode_pairs(tokenizer, queries: list[str], answers: list[str | None],
                 max_length: int = 256, templated: list[bool] | None = None) -> Batch:
    """Tokenise query + answer rows; an answer of None gives a query-only row.  An answer
    right after a line break (a chat reply's first word) has no separating space."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows: list[tuple[list[int], list[int]]] = []
    for i, (q, a) in enumerate(zip(queries, answers)):
        chat = bool(templated and templated[i])
        q_ids = encode_query(tokenizer, q, chat)
        a_ids = (tokenizer(a.strip(), add_special_tokens=False)["input_ids"] if chat and q.endswith("\n")
                 else encode_answer(tokenizer, a)) if a else []
        keep_q = max(1, max_length - len(a_ids))
        rows.append((q_ids[-keep_q:], a_ids[:max_length - 1]))
    width = max(len(q) + len(a) for q, a in rows)
    n = len(rows)
    input_ids = torch.full((n, width), pad, dtype=torch.long)
    attn = torch.zeros((n, width), dtype=torch.long)
    labels = torch.full((n, width), -100, dtype=torch.long)
    qmask = torch.zeros((n, width), dtype=torch.long)
    for i, (q, a) in enumerate(rows):
        seq = q + a
        start = width - len(seq)
        input_ids[i, start:] = torch.tensor(seq)
        attn[i, start:] = 1
        qmask[i, start:start + len(q)] = 1
        if a:
            labels[i, width - len(a):] = torch.tensor(a)
    position_ids = (attn.cumsum(-1) - 1).clamp_min(0)
    answer_len = max((len(a) for _, a in rows), default=0)
    return Batch(input_ids, attn, position_ids, labels, qmask, answer_len)


def length_groups(lengths: torch.Tensor, overhead: int = 64, max_groups: int = 4) -> list[torch.Tensor]:
    """Row indices in groups of like length, each group run as its own batch.

    A batch costs its rows times its longest row: a shard's chat turns are three times as
    long as its bare prompts, so in one batch most of the work was padding (a ZsRE shard:
    3,897 real tokens in 10,540).  Groups are contiguous runs of the rows sorted by length,
    chosen to minimise padded tokens plus ``overhead`` per extra call (what one more forward
    pass costs, in tokens); at most ``max_groups``.  lengths: (N,) host tensor.
    """
    order = torch.argsort(lengths, stable=True)
    ls = lengths[order].tolist()
    n = len(ls)
    if n == 0:
        return []
    inf = float("inf")
    # best[g][j]: least cost of the first j sorted rows in g groups; cut[g][j]: where the last starts
    best = [[inf] * (n + 1) for _ in range(max_groups + 1)]
    cut = [[0] * (n + 1) for _ in range(max_groups + 1)]
    best[0][0] = 0.0
    for g in range(1, max_groups + 1):
        for j in range(1, n + 1):
            for i in range(j):
                c = best[g - 1][i] + (j - i) * ls[j - 1] + (overhead if g > 1 else 0)
                if c < best[g][j]:
                    best[g][j], cut[g][j] = c, i
    g = min(range(1, max_groups + 1), key=lambda k: best[k][n])
    groups, j = [], n
    while g > 0:
        i = cut[g][j]
        groups.append(order[i:j])
        j, g = i, g - 1
    return groups[::-1]
