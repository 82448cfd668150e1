"""Generation cost of a lifelong checkpoint: many side memories, thousands of edits.

    python benchmarks/many_memories.py --memories 100                      # T = 10,000
    python benchmarks/many_memories.py --memories 10 --edits-per-memory 100  # T = 1,000

Installs the state that merge mode leaves after ``memories x edits-per-memory`` edits: that
many memories (random and small, so they barely change the text), and per edit four router
keys, three answer keys, a subject and a target, as ``wise edit`` stores them.  The first
prompts name an edited subject (their keys are their own activations), so the router sends
each to its memory; the others name none.  Greedy generation is timed on the unedited model,
with every memory computed on every token, and with only the memories a prompt can be routed
to; and, on the prompts that name no edited subject alone, unedited against patched: what a
deployment pays on the text it was not edited for.  Prints the overheads and whether the two
memory paths generated the same tokens.
"""
from __future__ import annotations

import argparse
import json
import random
import time

import torch

from wisecli.batching import encode_pairs
from wisecli.methods.wise.config import WiseConfig
from wisecli.app.session import open_model
from wisecli.runtime import router
from wisecli.runtime.router import RouterConfig

# Per edit, as ``wise edit`` keeps them: keys_per_edit; prompt and two chat turns; four other
# relations of its subject, two ways each (editor._other_keys).
KEYS, ANSWER_KEYS, OTHER_KEYS = 4, 3, 8
OTHER = ["Tell me about the history of Rome.", "What is the boiling point of water?", "Who wrote Hamlet?",
         "The largest planet in the solar system is", "Python is a programming language that",
         "My favourite food is", "The weather today is", "In 1492, Columbus"]
# Subjects of the routed prompts: words every tokenizer spells (the tests' word-level one too).
ROUTED = ["france", "spain", "italy", "germany", "england", "paris", "london", "berlin"]
SYLLABLES = ["ka", "vel", "mor", "ti", "zan", "qua", "rel", "do", "pher", "lin", "sa", "gro", "nu", "bex", "ol", "tra"]


def names(n: int, seed: int) -> list[str]:
    """``n`` distinct made-up names (subjects and targets no real prompt names)."""
    rng, out = random.Random(seed), dict.fromkeys([])
    while len(out) < n:
        out["".join(rng.choice(SYLLABLES) for _ in range(3)).capitalize() + " "
            + "".join(rng.choice(SYLLABLES) for _ in range(2)).capitalize()] = None
    return list(out)


def lifelong_state(mem, acts: torch.Tensor, last: torch.Tensor, k: int, per_memory: int,
                   gen: torch.Generator) -> tuple[dict, list, list]:
    """The layer's state after ``k * per_memory`` edits; the first ``len(acts)`` edits are the
    routed prompts' (acts: their tokens' activations; last: their answer positions')."""
    n_edits, d = k * per_memory, mem.in_features
    routed = acts.shape[0]
    keys = torch.randn(n_edits, KEYS, d, generator=gen)
    keys[:routed] = acts[:, -KEYS:]
    answers = torch.randn(n_edits, ANSWER_KEYS, d, generator=gen)
    answers[:routed] = last[:, None]
    others = torch.randn(n_edits, OTHER_KEYS, d, generator=gen)  # random: far from every answer position
    owner = torch.arange(n_edits)
    memory = owner // per_memory
    memory[:routed] = torch.arange(routed) % k  # each routed prompt in its own memory where there are enough
    state = {**mem.wise_state(),
             "memories": torch.randn(k, mem.out_features, d, generator=gen) * 1e-4,
             "thresholds": torch.zeros(k), "min_edit_scores": torch.zeros(k),
             "edit_keys": keys.reshape(-1, d).half(), "key_edit": owner.repeat_interleave(KEYS),
             "key_memory": memory.repeat_interleave(KEYS), "answer_keys": answers.reshape(-1, d).half(),
             "answer_key_edit": owner.repeat_interleave(ANSWER_KEYS), "other_keys": others.reshape(-1, d).half(),
             "other_key_edit": owner.repeat_interleave(OTHER_KEYS)}
    subjects = ROUTED[:routed] + names(n_edits, 0)[routed:]
    targets = names(n_edits, 1)
    return state, [(int(m), s) for m, s in zip(memory, subjects)], [(int(m), t) for m, t in zip(memory, targets)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--memories", type=int, default=100)
    ap.add_argument("--edits-per-memory", type=int, default=100)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    sess = open_model(args.model, device=args.device)
    mem, tok, model = sess.mem, sess.tokenizer, sess.model
    dev = mem.memories.device
    k = args.memories
    routed = [f"the capital city of {s} is" for s in ROUTED[:min(len(ROUTED), k * args.edits_per_memory)]]
    seen: list[torch.Tensor] = []
    handle = mem.register_forward_pre_hook(lambda _m, a: seen.append(a[0]))
    batch = encode_pairs(tok, routed, [None] * len(routed)).to(dev)
    with torch.no_grad(), mem.main_only():
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids)
    handle.remove()
    acts = seen[0].float().cpu()
    state, edit_subjects, edit_targets = lifelong_state(mem, acts, acts[:, -1], k, args.edits_per_memory,
                                                        torch.Generator().manual_seed(0))
    mem.load_wise_state(state, edit_subjects, edit_targets)
    mem.configure(RouterConfig.from_config(WiseConfig()))  # the defaults' path
    tok.padding_side = "left"
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def once(enc) -> tuple[float, torch.Tensor]:
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=pad)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t, out

    def timed(prompts: list[str]) -> tuple[float, torch.Tensor]:
        enc = tok(prompts, return_tensors="pt", padding=True).to(dev)
        runs = [once(enc) for _ in range(args.reps)]
        return min(t for t, _ in runs), runs[-1][1]

    def alternated(prompts: list[str]) -> tuple[float, float]:
        """Unedited and patched in turns, the best of each: a slow minute of the machine
        falls on both instead of on whichever ran then."""
        enc = tok(prompts, return_tensors="pt", padding=True).to(dev)
        base_t, patched_t = float("inf"), float("inf")
        for _ in range(args.reps):
            with mem.main_only():
                base_t = min(base_t, once(enc)[0])
            patched_t = min(patched_t, once(enc)[0])
        return base_t, patched_t

    prompts = routed + OTHER
    with mem.main_only():
        base, _ = timed(prompts)
    default = router.SELECTIVE_FROM
    router.SELECTIVE_FROM = 10 ** 9  # compute every memory on every token
    every, out_every = timed(prompts)
    router.SELECTIVE_FROM = default
    routable, out_routable = timed(prompts)
    routes = mem.answered_route.tolist()
    base_other, patched_other = alternated(OTHER)
    res = {"memories": k, "edits": k * args.edits_per_memory, "prompts": len(prompts),
           "new_tokens": args.new_tokens, "seconds_unedited": base, "seconds_every_memory": every,
           "seconds_routable_only": routable, "overhead_every_memory": every / base - 1,
           "overhead_routable_only": routable / base - 1,
           "overhead_no_subject": patched_other / base_other - 1,
           "same_tokens": bool(torch.equal(out_every, out_routable)),
           "prompts_routed": sum(r >= 0 for r in routes[:len(routed)]),
           "other_prompts_routed": sum(r >= 0 for r in routes[len(routed):])}
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print(f"{k} memories, {res['edits']} edits; {res['prompts']} prompts ({res['prompts_routed']} of "
              f"{len(routed)} naming an edited subject routed, {res['other_prompts_routed']} others), "
              f"{args.new_tokens} new tokens")
        print(f"unedited {base:.2f} s | every memory {every:.2f} s ({res['overhead_every_memory']:+.1%}) | "
              f"routable only {routable:.2f} s ({res['overhead_routable_only']:+.1%}) | "
              f"same tokens: {res['same_tokens']}")
        print(f"prompts naming no edited subject: unedited {base_other:.2f} s, patched {patched_other:.2f} s "
              f"({res['overhead_no_subject']:+.1%})")


if __name__ == "__main__":
    main()
