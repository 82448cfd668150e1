"""Tests for wisecli.evaluate / wisecli.app.report on a tiny random LLaMA and a word-level tokenizer.

Nothing is downloaded: the model is built from a config, the tokenizer from a 50-word vocabulary,
so encode_pairs and generate run offline in well under a second each.
"""
from __future__ import annotations

import json

import pytest
import torch
from rich.console import Console
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

from wisecli.app.edits import EditRecord
from wisecli.app.metrics import EvalReport, evaluate, normalise, starts_with_target
from wisecli.methods.locate import set_module
from wisecli.app.report import eval_markdown, eval_table, fmt, summary_table
from wisecli.runtime.memory import SideMemoryLayer, install

WORDS = ("<pad> <eos> <unk> the a of is in capital city river king queen paris london rome berlin "
         "france england italy germany who what where born lives speaks language english french "
         "music plays team red blue green big small old new sea book film song name was and "
         "mountain lake").split()
TOP_KEYS = {"n_edits", "reliability", "generalization", "locality", "generated_accuracy",
            "portability", "perplexity", "seconds", "edits", "chat_accuracy", "repetition", "leakage",
            "generation_entropy", "same_subject_locality", "chat_accuracy_system", "chat_accuracy_turn",
            "chat_accuracy_sampled", "same_subject_chat"}


def make_tokenizer() -> PreTrainedTokenizerFast:
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>", padding_side="left")


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=len(WORDS),
                      pad_token_id=0, eos_token_id=1, bos_token_id=None)
    return AutoModelForCausalLM.from_config(cfg).eval()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls gain nothing from threads, and on a busy machine spinning OpenMP workers
    make them 100x slower; restored afterwards so other modules keep their setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return make_tokenizer()


@pytest.fixture()
def patched():
    """A fresh model with a side-memory layer (no memories yet) on layer 2's down_proj."""
    model = make_model()
    base = model.model.layers[2].mlp.down_proj
    mem = SideMemoryLayer(base, "linear", base.in_features, base.out_features)
    set_module(model, "model.layers.2.mlp.down_proj", mem)
    install(model, mem)
    return model, mem


EDITS = [
    EditRecord(id="e1", prompt="the capital of france is", target_new="rome",
               rephrase=("what is the capital city of france", "france capital"),
               locality_prompt="the king of england lives in", locality_ground_truth="london"),
    EditRecord(id="e2", prompt="who", target_new="the old king of italy",
               locality_prompt="the river of germany is the"),  # answer from the unedited model
    EditRecord(id="e3", prompt="the team plays music in the big city of", target_new="berlin",
               portability=(("the language of berlin is", "english"),)),
    EditRecord(id="e4", prompt="what book", target_new="red film"),
]


def set_memory(mem: SideMemoryLayer, threshold: float, size: float = 5.0) -> None:
    """One random side memory; threshold 0 routes every prompt to it, a huge one none."""
    gen = torch.Generator().manual_seed(1)
    mem.memories = size * torch.randn(1, mem.out_features, mem.in_features, generator=gen)
    mem.thresholds = torch.tensor([threshold])
    mem.min_edit_scores = torch.tensor([max(threshold, 1.0)])


def test_no_memory_is_unedited_model(tok, patched):
    model, mem = patched
    plain = evaluate(make_model(), tok, None, EDITS, batch_size=3)
    rep = evaluate(model, tok, mem, EDITS, batch_size=3)
    assert rep.locality == 1.0
    assert [e.locality for e in rep.edits] == [1.0, 1.0, None, None]
    assert all(e.routed is False for e in rep.edits)
    assert plain.locality == 1.0 and all(e.routed is None for e in plain.edits)
    for key in ("reliability", "generalization", "portability", "generated_accuracy"):
        assert getattr(rep, key) == getattr(plain, key)
    assert [e.generated_text for e in rep.edits] == [e.generated_text for e in plain.edits]


def test_routed_memory_changes_model_and_threshold_turns_it_off(tok, patched):
    model, mem = patched
    set_memory(mem, 0.0)
    rep = evaluate(model, tok, mem, EDITS, batch_size=4)
    assert all(e.routed is True for e in rep.edits)
    assert rep.locality is not None and rep.locality < 1.0
    set_memory(mem, 1e9)
    off = evaluate(model, tok, mem, EDITS, batch_size=4)
    assert all(e.routed is False for e in off.edits)
    assert off.locality == 1.0


# (size, threshold): all routed; none routed; a smaller memory whose threshold falls between
# the prompts' scores (e1 0.123, e2 0.119, e3 0.115, e4 0.109), so a batch mixes both routes
# and locality takes values strictly between 0 and 1.
@pytest.mark.parametrize("size,threshold", [(5.0, 0.0), (5.0, 1e9), (0.1, 0.117)])
def test_batch_size_invariance(tok, patched, size, threshold):
    model, mem = patched
    set_memory(mem, threshold, size)
    extra = [("the queen of italy", None), ("where is the lake", "in the mountain")]
    one = evaluate(model, tok, mem, EDITS, batch_size=1, extra_locality=extra)
    many = evaluate(model, tok, mem, EDITS, batch_size=16, extra_locality=extra)
    mixed = evaluate(model, tok, mem, EDITS, batch_size=3, extra_locality=extra)
    # Perplexity is a float reduction: equal to rounding, not to the bit, across batch shapes.
    ppl = [[e.pop("perplexity") for e in r.to_dict()["edits"]] for r in (one, many, mixed)]
    assert ppl[0] == pytest.approx(ppl[1], rel=1e-5) and ppl[0] == pytest.approx(ppl[2], rel=1e-5)
    strip = [[{k: v for k, v in e.items() if k != "perplexity"} for e in r.to_dict()["edits"]]
             for r in (one, many, mixed)]
    assert strip[0] == strip[1] == strip[2]
    assert one.locality == many.locality == mixed.locality
    if size < 1.0:
        assert [e.routed for e in one.edits] == [True, True, False, False]
        assert 0.0 < one.locality < 1.0


def test_target_the_model_generates_scores_one(tok):
    model = make_model()
    prompts = ["the capital of france is", "who", "where is the big river"]
    targets = []
    for p in prompts:
        enc = tok([p], return_tensors="pt", return_token_type_ids=False)
        out = model.generate(**enc, do_sample=False, max_new_tokens=3, pad_token_id=0)
        new = out[0, enc["input_ids"].shape[1]:].tolist()
        assert 0 not in new and 1 not in new  # no special token: the target re-encodes exactly
        targets.append(tok.decode(new))
    edits = [EditRecord(id=f"g{i}", prompt=p, target_new=t) for i, (p, t) in enumerate(zip(prompts, targets))]
    rep = evaluate(model, tok, None, edits, batch_size=2)
    assert rep.reliability == 1.0 and rep.generated_accuracy == 1.0
    assert all(e.generated_text.startswith(e.target) for e in rep.edits)
    wrong = [EditRecord(id="w", prompt=prompts[0], target_new="mountain lake mountain lake")]
    if not targets[0].startswith("mountain"):
        assert evaluate(model, tok, None, wrong).edits[0].generated == 0.0


def test_generate_off_and_progress(tok, patched):
    model, mem = patched
    seen: list[tuple[int, int]] = []
    rep = evaluate(model, tok, mem, EDITS, generate=False, batch_size=2,
                   progress=lambda d, t: seen.append((d, t)))
    assert rep.generated_accuracy is None and all(e.generated is None for e in rep.edits)
    assert seen and seen[-1][0] == seen[-1][1]
    assert all(a[0] < b[0] for a, b in zip(seen, seen[1:]))


def test_normalised_match():
    assert normalise("  ,  Paris\n is") == "paris is"
    assert starts_with_target(": PARIS  is big", "paris is")
    assert not starts_with_target("the paris", "Paris")


def test_report_dict_and_rendering(tok, patched):
    model, mem = patched
    set_memory(mem, 0.0)
    rep = evaluate(model, tok, mem, EDITS, batch_size=4, max_new_tokens=4)
    d = json.loads(json.dumps(rep.to_dict()))
    assert set(d) == TOP_KEYS and d["n_edits"] == 4 and len(d["edits"]) == 4
    assert d["perplexity"] >= 1.0
    for key in TOP_KEYS - {"edits", "n_edits", "perplexity", "seconds", "generation_entropy"}:
        assert d[key] is None or (isinstance(d[key], float) and 0.0 <= d[key] <= 1.0), key
    assert d["seconds"] > 0 and d["generation_entropy"] >= 0
    assert d["chat_accuracy"] is None  # this tokenizer has no chat template: not measured, not failed
    use = d["edits"][0]["use"]
    assert len(use["continuation"]) > 0 and use["chat_question"] is None
    assert use["same_subject"] is None  # a lower-case prompt names no subject: no probes
    assert d["edits"][0]["generalization"] is not None and d["edits"][3]["generalization"] is None
    assert d["edits"][2]["portability"] is not None and d["edits"][0]["portability"] is None
    md = eval_markdown(rep)
    for value in (rep.reliability, rep.generalization, rep.locality, rep.generated_accuracy, rep.portability):
        assert fmt(value) in md
    assert "| e1 |" in md and "| edits | 4 |" in md
    console = Console(record=True, width=160)
    console.print(eval_table(rep))
    console.print(summary_table("wise info", {"model": "tiny", "edits": 4, "locality": 0.5, "x": None}))
    text = console.export_text()
    assert "total (4)" in text and "e3" in text and "—" in text and "0.500" in text


def test_fmt():
    assert fmt(None) == "—" and fmt(0.91666) == "0.917" and fmt(1.0) == "1.000"
    assert isinstance(EvalReport(0, None, None, None, None, None, [], 0.0).to_dict()["edits"], list)


def test_perplexity_is_exp_mean_nll_of_the_target(tok):
    """Computed by hand with a plain forward of prompt + target, one edit at a time."""
    model = make_model()
    rep = evaluate(model, tok, None, EDITS, batch_size=3, generate=False)
    for e, res in zip(EDITS, rep.edits):
        p_ids = tok(e.prompt, add_special_tokens=False)["input_ids"]
        t_ids = tok(" " + e.target_new, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([p_ids + t_ids])
        with torch.no_grad():
            logp = model(input_ids=ids).logits[0].log_softmax(-1)
        nll = -torch.stack([logp[len(p_ids) - 1 + i, t] for i, t in enumerate(t_ids)]).mean()
        assert res.perplexity == pytest.approx(float(nll.exp()), rel=1e-4)
    assert rep.perplexity == pytest.approx(sum(r.perplexity for r in rep.edits) / len(EDITS))
    assert rep.perplexity > 1.0


def test_chat_is_asked_under_each_condition_and_same_subject_chat_sees_the_memory(patched):
    """With a chat template: chat accuracy under every condition, and the subject's other
    relations asked in chat -- unchanged while the memory is shut, changed when it answers."""
    chat_tok = make_tokenizer()
    chat_tok.chat_template = ("{% for m in messages %}{{ m['content'] }} {% endfor %}"
                              "{% if add_generation_prompt %}the{% endif %}")
    model, mem = patched
    edits = [EditRecord(id="s", prompt="the capital of france is", target_new="rome", subject="france")]
    set_memory(mem, 1e9)
    shut = evaluate(model, chat_tok, mem, edits, batch_size=4, max_new_tokens=4)
    for key in ("chat_accuracy", "chat_accuracy_system", "chat_accuracy_turn", "chat_accuracy_sampled"):
        assert getattr(shut, key) in (0.0, 1.0), key
    assert shut.same_subject_chat == 1.0 and shut.edits[0].use.same_subject_chat == 1.0
    set_memory(mem, 0.0)
    opened = evaluate(model, chat_tok, mem, edits, batch_size=4, max_new_tokens=4)
    assert opened.same_subject_chat is not None and opened.same_subject_chat < 1.0
    quick = evaluate(model, chat_tok, mem, edits, batch_size=4, max_new_tokens=4, chat_conditions=False)
    assert quick.chat_accuracy in (0.0, 1.0) and quick.chat_accuracy_system is None and quick.same_subject_chat is None


def test_sampled_chat_is_seeded_and_leaves_the_callers_random_state():
    from wisecli.app.chat_use import chat_replies
    chat_tok = make_tokenizer()
    chat_tok.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    model = make_model()
    asked = [[{"role": "user", "content": "the capital of france is"}]] * 3
    torch.manual_seed(5)
    state = torch.get_rng_state()
    first = chat_replies(model, chat_tok, asked, batch_size=3, tokens=8, sample=True)
    assert torch.equal(torch.get_rng_state(), state)
    assert chat_replies(model, chat_tok, asked, batch_size=3, tokens=8, sample=True) == first
    assert len(set(first)) > 1  # sampled rows differ from one another, greedy ones could not
