"""The serving worker's batches, in process, on a tiny patched model: rows that join a
running batch, leave it, keep their own settings, and are refused past the queue bound.

What a client sees over HTTP is in test_serve.py; here each row's output is compared with
what the model generates for it alone."""
from __future__ import annotations

import threading

import pytest
import torch

from wisecli.app.pipeline import EditOptions, edit
from wisecli.app.serve import Batcher, Stats
from wisecli.app.serve.batcher import QueueFull
from wisecli.app.serve.decoding import Batch, choose
from wisecli.app.serve.rows import Row, Sampling
from wisecli.app.session import open_model
from wisecli.runtime.gates import route_names

from conftest import EDITS, write_jsonl

pytestmark = pytest.mark.usefixtures("single_thread")

LEARN = "learning_rate: 0.5\nreplay_weight: 0.15\nmax_steps: 60\nmask_ratio: 0.5\nn_prefixes: 2\n" \
        "n_negatives: 4\nnegative_lengths: [4]\nnegatives_per_step: 4\n"
PROMPTS = [EDITS[0]["prompt"], "who plays music in the big city", EDITS[2]["prompt"], "the capital of spain is",
           "the old king wrote a book and the queen"]


@pytest.fixture(scope="module")
def session(tmp_path_factory, tiny_llama_dir):
    d = tmp_path_factory.mktemp("batching")
    (d / "learn.yaml").write_text(LEARN)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WISE_CACHE", str(d / "cache"))
        edit(str(tiny_llama_dir), write_jsonl(d / "edits.jsonl", EDITS), d / "patched",
             EditOptions(config_file=str(d / "learn.yaml"), evaluate=False, device="cpu"))
        return open_model(str(d / "patched"), device="cpu")


def _alone(sess, prompt: str, n: int) -> str:
    tok = sess.tokenizer
    enc = tok([prompt], return_tensors="pt", return_token_type_ids=False)
    with torch.no_grad():
        out = sess.model.generate(**enc, do_sample=False, max_new_tokens=n, min_new_tokens=n,
                                  pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def _row(sess, prompt: str, sampling: Sampling, events: list | None = None) -> Row:
    sink = (lambda kind, value: events.append((kind, value))) if events is not None else (lambda *_: None)
    return Row(sess.tokenizer(prompt)["input_ids"], sampling, sess.tokenizer, sink)


def _alone_logits(sess, prompt: str, n: int) -> tuple[torch.Tensor, str]:
    """(n, V) the logits ``generate`` computes for the prompt alone, greedy, and the memory
    that answered it."""
    tok = sess.tokenizer
    enc = tok([prompt], return_tensors="pt", return_token_type_ids=False)
    with torch.no_grad():
        out = sess.model.generate(**enc, do_sample=False, max_new_tokens=n, min_new_tokens=n,
                                  pad_token_id=tok.pad_token_id, output_logits=True, return_dict_in_generate=True)
    return torch.cat(out.logits), route_names(sess.mem.answered_route)[0]


def _take(batch: Batch, logits: torch.Tensor, seen: dict[int, list[torch.Tensor]]) -> bool:
    """One step's tokens into the rows (their logits kept); finished rows leave; False when none is left."""
    tokens, names = choose(logits, batch.rows), batch.memories()
    for i, row in enumerate(batch.rows):
        seen.setdefault(id(row), []).append(logits[i])
        row.memory = names[i]
        row.add(int(tokens[i]), set())  # the tiny model's eos is not an end here: every row runs its length
    batch.next = tokens[:, None]
    alive = [i for i, row in enumerate(batch.rows) if not row.done]
    if alive and len(alive) < len(batch.rows):
        batch.keep(torch.tensor(alive))
    return bool(alive)


def test_rows_that_join_a_running_batch_compute_what_they_compute_alone(session):
    """Two rows start; three join after three steps; rows of different lengths leave as
    they finish.  Every step's logits for every row are those of ``generate`` for its prompt
    alone, and the edit's prompt is answered by the side memory, the unrelated ones by the model."""
    sess, pad, seen = session, session.tokenizer.pad_token_id, {}
    lengths = [6, 9, 4, 8, 7]
    rows = [_row(sess, p, Sampling(n)) for p, n in zip(PROMPTS, lengths)]
    with torch.no_grad():
        batch, logits = Batch.prefill(sess.model, sess.mem, rows[:2], pad)
        _take(batch, logits, seen)
        for _ in range(3):
            _take(batch, batch.step(), seen)
        group, logits = Batch.prefill(sess.model, sess.mem, rows[2:], pad)
        _take(group, logits, seen)
        assert batch.join(group) and len(batch.rows) == 5
        while _take(batch, batch.step(), seen):
            pass
    for row, prompt, n in zip(rows, PROMPTS, lengths):
        logits, memory = _alone_logits(sess, prompt, n)
        torch.testing.assert_close(torch.stack(seen[id(row)]), logits, atol=1e-4, rtol=1e-4)
        assert row.result.memory == memory
    assert [r.result.text for r in rows] == [_alone(sess, p, n) for p, n in zip(PROMPTS, lengths)]
    assert rows[0].result.memory.startswith("side[") and rows[1].result.memory == "main"
    assert EDITS[0]["target_new"] in rows[0].result.text


def _serve(sess, rows_by_request: list[list[Row]], max_batch: int = 8) -> Stats:
    """Run the worker on its own thread until every row has ended."""
    stats, stop = Stats(), threading.Event()
    batcher = Batcher(sess.model, sess.tokenizer, sess.mem, stats, max_batch=max_batch, max_queue=64)
    worker = threading.Thread(target=batcher.run, args=(stop,))
    worker.start()
    try:
        for rows in rows_by_request:
            batcher.submit(rows)
        for row in (r for rows in rows_by_request for r in rows):
            for _ in range(600):
                if row.done:
                    break
                threading.Event().wait(0.05)
    finally:
        stop.set()
        worker.join(timeout=60)
    return stats


def test_each_row_keeps_its_own_settings_in_one_batch(session):
    """Greedy with its own max_tokens, a stop string, and seeded sampling side by side: the
    stop cuts the text, the seeded draw repeats whatever shares its batch."""
    sess = session
    alone = _alone(sess, PROMPTS[1], 8)
    stop_word = alone.split()[2]
    greedy = _row(sess, PROMPTS[0], Sampling(5))
    stopped = _row(sess, PROMPTS[1], Sampling(8, stop=(stop_word,)))
    drawn = [_row(sess, PROMPTS[3], Sampling(6, temperature=1.0, top_p=0.9, seed=7)) for _ in range(2)]
    _serve(sess, [[greedy], [stopped], [drawn[0]]])
    _serve(sess, [[drawn[1]]])
    assert greedy.result.text == _alone(sess, PROMPTS[0], 5) and greedy.result.finish_reason == "length"
    assert greedy.result.completion_tokens == 5
    assert stopped.result.text == alone[:alone.index(stop_word)] and stopped.result.finish_reason == "stop"
    assert drawn[0].result.text == drawn[1].result.text and drawn[0].result.completion_tokens == 6


def test_a_cancelled_row_leaves_the_batch_and_the_others_go_on(session):
    sess, events = session, []
    leaving = _row(sess, PROMPTS[1], Sampling(200), events)
    staying = _row(sess, PROMPTS[0], Sampling(12))
    original = leaving.sink

    def sink(kind: str, value) -> None:
        original(kind, value)
        if kind == "text":
            leaving.cancel()  # the client goes after its first piece
    leaving.sink = sink
    _serve(sess, [[leaving, staying]])
    assert leaving.result.finish_reason == "cancelled" and len(leaving.tokens) <= 2
    assert staying.result.text == _alone(sess, PROMPTS[0], 12)


def test_stats_count_steps_rows_and_answering_memories(session):
    sess = session
    rows = [_row(sess, p, Sampling(4)) for p in PROMPTS[:3]]
    stats = _serve(sess, [[r] for r in rows])
    text = stats.render(queued=0, running=0)
    assert "wise_generation_tokens_total 12" in text
    assert 'wise_memory_answers_total{memory="main"} 1' in text
    assert stats.batch_rows.n >= 4 and stats.batch_rows.sum == 12  # a step can hold several rows
    assert stats.duration.n == 3 and stats.first_token.n == 3


def test_a_full_queue_refuses_a_whole_request(session):
    sess = session
    batcher = Batcher(sess.model, sess.tokenizer, sess.mem, Stats(), max_batch=2, max_queue=3)
    batcher.submit([_row(sess, p, Sampling(2)) for p in PROMPTS[:2]])
    with pytest.raises(QueueFull) as full:
        batcher.submit([_row(sess, p, Sampling(2)) for p in PROMPTS[:2]])
    assert full.value.retry_after >= 1 and batcher.queued == 2
    batcher.submit([_row(sess, PROMPTS[2], Sampling(2))])
    assert batcher.queued == 3
