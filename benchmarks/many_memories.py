"""Generation cost with many side memories (retrieve mode at large T): every memory
computed on every token against only the ones a prompt can be routed to.

    python benchmarks/many_memories.py --memories 100

Installs random memories (small, so they barely change the text) whose keys are the
activations of the first prompts' last tokens, so those prompts are routed to one memory
each and the rest to none, then times greedy generation three ways: no memories, every
memory computed, routable memories only.  Prints the overheads and whether the two
memory paths generated the same tokens.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from wisecli.batching import encode_pairs
from wisecli.methods.wise.config import WiseConfig
from wisecli.app.session import open_model
from wisecli.runtime import router
from wisecli.runtime.router import RouterConfig

ROUTED = [f"The capital city of country number {i} is" for i in range(8)]
OTHER = ["Tell me about the history of Rome.", "What is the boiling point of water?", "Who wrote Hamlet?",
         "The largest planet in the solar system is", "Python is a programming language that",
         "My favourite food is", "The weather today is", "In 1492, Columbus"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--memories", type=int, default=100)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    sess = open_model(args.model, device=args.device)
    mem, tok, model = sess.mem, sess.tokenizer, sess.model
    dev = mem.memories.device
    k = max(args.memories, len(ROUTED))
    gen = torch.Generator().manual_seed(0)
    seen: list[torch.Tensor] = []
    handle = mem.register_forward_pre_hook(lambda _m, a: seen.append(a[0]))
    batch = encode_pairs(tok, ROUTED, [None] * len(ROUTED)).to(dev)
    with torch.no_grad(), mem.main_only():
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    handle.remove()
    keys = torch.cat([seen[0][:, -1].float().cpu(), torch.randn(4 * k - len(ROUTED), mem.in_features, generator=gen)])
    state = {**mem.wise_state(),
             "memories": torch.randn(k, mem.out_features, mem.in_features, generator=gen) * 1e-4,
             "thresholds": torch.zeros(k), "min_edit_scores": torch.zeros(k), "edit_keys": keys,
             "key_edit": torch.arange(4 * k),  # one key per edit: coverage is the key's own cosine
             "key_memory": torch.cat([torch.arange(len(ROUTED)), torch.arange(len(ROUTED), 4 * k) % k])}
    mem.load_wise_state(state)
    mem.configure(RouterConfig.from_config(WiseConfig()))  # the defaults' path
    tok.padding_side = "left"
    enc = tok(ROUTED + OTHER, return_tensors="pt", padding=True).to(dev)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def timed() -> tuple[float, torch.Tensor]:
        best, out = float("inf"), None
        for _ in range(args.reps):
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            with torch.no_grad():
                out = model.generate(**enc, max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=pad)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t)
        return best, out

    with mem.main_only():
        base, _ = timed()
    default = router.SELECTIVE_FROM
    router.SELECTIVE_FROM = 10 ** 9  # compute every memory on every token
    every, out_every = timed()
    router.SELECTIVE_FROM = default
    routable, out_routable = timed()
    routes = mem.answered_route.tolist()
    res = {"memories": k, "prompts": len(ROUTED + OTHER), "new_tokens": args.new_tokens,
           "seconds_unedited": base, "seconds_every_memory": every, "seconds_routable_only": routable,
           "overhead_every_memory": every / base - 1, "overhead_routable_only": routable / base - 1,
           "same_tokens": bool(torch.equal(out_every, out_routable)),
           "prompts_routed": sum(r >= 0 for r in routes)}
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print(f"{k} memories, {res['prompts']} prompts ({res['prompts_routed']} routed), {args.new_tokens} new tokens")
        print(f"unedited {base:.2f} s | every memory {every:.2f} s ({res['overhead_every_memory']:+.1%}) | "
              f"routable only {routable:.2f} s ({res['overhead_routable_only']:+.1%}) | "
              f"same tokens: {res['same_tokens']}")


if __name__ == "__main__":
    main()
