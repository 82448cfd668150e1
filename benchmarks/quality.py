"""Lifelong-protocol quality benchmark: apply T edits in sequence, then evaluate all of them.

Uses the same readers, editor and metrics as ``wise edit`` / ``wise eval``:

    python benchmarks/quality.py --dataset zsre --T 10 100 --mode merge
    python benchmarks/quality.py --dataset counterfact --T 100 --model gemma3-270m
    python benchmarks/quality.py --dataset hallucination --T 100

Prints a table, writes ``benchmarks/results/quality-<dataset>-<model>-<mode>.json`` and a
PNG of the metrics against T.  Development slices by default (the first records of each
dev file); ``--dataset zsre --offset 500`` and ``--dataset knowedit-zsre`` are the final-test
slices.  ``--negatives train`` draws the router's irrelevant prompts from the dataset's
train split, as the WISE paper does; the default is what ``wise edit`` does by default
(text the model writes itself).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from wisecli.app.edits import load_edits
from wisecli.app.metrics import evaluate
from wisecli.app.pipeline import EditOptions, Silent, edit
from wisecli.app.session import open_model

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DATASETS = {
    "zsre": DATA / "zsre" / "zsre_mend_eval.json",
    "counterfact": DATA / "counterfact" / "counterfact-edit.json",
    "hallucination": DATA / "hallucination" / "hallucination-edit.json",
    "knowedit-zsre": DATA / "knowedit" / "benchmark_ZsRE_ZsRE-test-all.json",
}
# Where each dataset's irrelevant prompts come from with --negatives train (never the eval file).
TRAIN = {
    "zsre": DATA / "zsre" / "zsre_mend_train_1k.json",
    "knowedit-zsre": DATA / "zsre" / "zsre_mend_train_1k.json",
    "counterfact": DATA / "counterfact" / "counterfact-train.json",
    "hallucination": DATA / "hallucination" / "hallucination-train.json",
}


USE_FIELDS = ("generated_accuracy", "chat_accuracy", "chat_accuracy_system", "chat_accuracy_turn",
              "chat_accuracy_sampled", "repetition", "leakage", "generation_entropy", "same_subject_locality",
              "same_subject_chat")


class _Stderr(Silent):
    """A line every 100 edits: a T=1000 run is hours on a CPU."""

    def __init__(self, t: int) -> None:
        self.t, self.t0, self.printed = t, time.perf_counter(), 0

    @contextmanager
    def phase(self, name: str, total: int):
        def tick(done: int, note: str = "") -> None:
            if name == "editing" and done != self.printed and (done % 100 == 0 or done == total):
                self.printed = done
                rate = (time.perf_counter() - self.t0) / done
                print(f"  T={self.t}: {done} edits applied, {rate:.2f} s/edit", file=sys.stderr, flush=True)
        yield tick


def run_once(args: argparse.Namespace, t: int) -> dict:
    records = load_edits(DATASETS.get(args.dataset, Path(args.dataset)), offset=args.offset, limit=t)
    sess = open_model(args.model, device=args.device, dtype=args.dtype, config_file=args.config, method=args.method)
    base_ppl = None
    if args.dataset == "hallucination":  # the unedited model's perplexity, printed beside
        base_ppl = evaluate(sess.model, sess.tokenizer, None, records, generate=False).perplexity
    negatives = {"generated": None}.get(args.negatives, args.negatives)
    if negatives == "train":
        negatives = str(TRAIN[args.dataset])
    # Lifelong: the edits arrive in batches of ``arrival``, each applied on top of the last,
    # then all T are evaluated on the final model.
    options = EditOptions(mode=args.mode, config_file=args.config, negatives=negatives, arrival=args.arrival,
                          patch_only=True, method=args.method, evaluate=not args.use_sample)
    run = edit(sess, records, _saved(args, t) if args.save else None, options, _Stderr(t),
               edits_source=args.dataset)
    steps = {p["shard"]: p["steps"] for p in run.placed}  # optimisation steps each shard took
    report = run.report or _sampled(sess, records, args.use_sample)
    row = {k: v for k, v in report.to_dict().items() if k != "edits"}
    parts = [row[k] for k in ("reliability", "generalization", "locality") if row[k] is not None]
    row.update(T=t, avg=sum(parts) / len(parts), seconds_per_edit=run.seconds_editing / len(records),
               memories=sess.mem.n_memories, base_perplexity=base_ppl, use_sample=args.use_sample or None,
               mean_steps_per_shard=sum(steps.values()) / max(len(steps), 1))
    return row


def _sampled(sess, records: list, n: int):
    """Teacher-forced figures over every edit; the generation-based use figures (greedy
    generated accuracy, chat, repetition, leakage, same-subject) over a fixed random sample
    of ``n`` edits (seed 0), for runs where generating for every edit would not fit."""
    import random
    report = evaluate(sess.model, sess.tokenizer, sess.mem if sess.mem.n_memories else None, records, generate=False)
    sample = sorted(random.Random(0).sample(range(len(records)), min(n, len(records))))
    used = evaluate(sess.model, sess.tokenizer, sess.mem if sess.mem.n_memories else None, [records[i] for i in sample])
    return dataclasses.replace(report, **{name: getattr(used, name) for name in USE_FIELDS})


def _saved(args: argparse.Namespace, t: int) -> Path:
    return Path(args.save) / f"T{t}"


def _f(x: float | None, width: int = 6) -> str:
    return f"{'-':>{width}}" if x is None else f"{x:>{width}.3f}"


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    ts = [r["T"] for r in rows]
    for key in ("reliability", "generalization", "locality", "generated_accuracy"):
        ax.plot(ts, [r[key] if r[key] is not None else float("nan") for r in rows], marker="o", label=key)
    ax.set_xscale("log")
    ax.set_xlabel("T (edits applied in sequence)")
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="zsre", help=f"{', '.join(DATASETS)} or a path")
    ap.add_argument("--T", type=int, nargs="+", default=[10, 100])
    ap.add_argument("--method", default=None, help="wise (the default) or ultraedit")
    ap.add_argument("--mode", default=None, choices=["merge", "retrieve"], help="wise's mode (default merge)")
    ap.add_argument("--use-sample", type=int, default=0,
                    help="teacher-forced figures over every edit, generation-based ones over this many (0: all)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--config", default=None)
    ap.add_argument("--offset", type=int, default=0)
    ap.add_argument("--arrival", type=int, default=10, help="edits per lifelong arrival")
    ap.add_argument("--negatives", default="generated",
                    help="router negatives: generated (wise edit's default), train (the dataset's "
                         "train split, as in the WISE paper) or a file")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--save", default=None,
                    help="also write each T's patched checkpoint (patch only) to SAVE/T<T>")
    args = ap.parse_args()
    taken = [str(_saved(args, t)) for t in args.T if args.save and _saved(args, t).exists()]
    if taken:  # before hours of training, not after
        sys.exit(f"quality.py: --save: {taken[0]} already exists; choose another directory")
    rows = []
    print(f"{'T':>6} {'rel':>6} {'gen':>6} {'loc':>6} {'gen-acc':>8} {'avg':>6} {'ppl':>8} "
          f"{'base-ppl':>9} {'chat':>6} {'c-sys':>6} {'c-turn':>6} {'c-smp':>6} {'rep':>6} {'leak':>6} "
          f"{'same-s':>6} {'ss-cht':>6} {'s/edit':>7}")
    for t in args.T:
        row = run_once(args, t)
        rows.append(row)
        print(f"{t:>6} {_f(row['reliability'])} {_f(row['generalization'])} {_f(row['locality'])} "
              f"{_f(row['generated_accuracy'], 8)} {_f(row['avg'])} {_f(row['perplexity'], 8)} "
              f"{_f(row['base_perplexity'], 9)} {_f(row['chat_accuracy'])} {_f(row['chat_accuracy_system'])} "
              f"{_f(row['chat_accuracy_turn'])} {_f(row['chat_accuracy_sampled'])} {_f(row['repetition'])} "
              f"{_f(row['leakage'])} {_f(row['same_subject_locality'])} {_f(row['same_subject_chat'])} "
              f"{row['seconds_per_edit']:>7.2f}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    mode = args.mode or ("merge" if args.method in (None, "wise") else args.method)
    name = f"quality-{Path(args.dataset).stem}-{Path(args.model).name}-{mode}" + \
        (f"-from{args.offset}" if args.offset else "") + \
        ("" if args.negatives == "generated" else f"-neg-{Path(args.negatives).stem}")
    (out / f"{name}.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2) + "\n")
    plot(rows, out / f"{name}.png", name)
    print(f"wrote {out / name}.json and .png")


if __name__ == "__main__":
    main()
