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
import json
import sys
import time
from pathlib import Path

from wisecli.checkpoint import write_checkpoint
from wisecli.cli.edit import edit_manifest
from wisecli.edits import load_edits, load_prompts
from wisecli.evaluate import evaluate
from wisecli.session import open_model, session_config
from wisecli.wise.editor import WiseEditor

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


def run_once(args: argparse.Namespace, t: int) -> dict:
    records = load_edits(DATASETS.get(args.dataset, Path(args.dataset)), offset=args.offset, limit=t)
    sess = open_model(args.model, device=args.device, dtype=args.dtype, config_file=args.config)
    cfg = session_config(sess, args.config, {"mode": args.mode})
    editor = WiseEditor(sess.model, sess.tokenizer, sess.mem, sess.blocks, sess.target.layer, cfg)
    base_ppl = None
    if args.dataset == "hallucination":  # the unedited model's perplexity, printed beside
        base_ppl = evaluate(sess.model, sess.tokenizer, None, records, generate=False).perplexity
    negatives = None
    if args.negatives == "train":
        negatives = load_prompts(TRAIN[args.dataset])
    elif args.negatives != "generated":
        negatives = load_prompts(args.negatives)
    editor.prepare(negatives, source=args.negatives)
    t0 = time.perf_counter()
    # Lifelong: the edits arrive in batches of edits_per_shard, each applied on top of the last.
    placed: list[dict] = []
    for i in range(0, len(records), args.arrival):
        placed += editor.apply(records[i:i + args.arrival])
        done = min(i + args.arrival, len(records))
        if done % 100 == 0 or done == len(records):  # long runs (T=1000 is an hour on a CPU)
            spent = time.perf_counter() - t0
            print(f"  T={t}: {done} edits applied, {spent / done:.2f} s/edit", file=sys.stderr, flush=True)
    seconds = time.perf_counter() - t0
    if args.save:  # the trained state, to re-evaluate later (wise eval) without retraining
        manifest = edit_manifest(sess, cfg, editor, records, placed, None, Path(args.dataset), seconds)
        write_checkpoint(_saved(args, t), base_dir=sess.base_dir, tensors=dict(sess.mem.wise_state()),
                         manifest=manifest, patch_only=True)
    steps = {p["shard"]: p["steps"] for p in placed}  # optimisation steps each shard took
    report = evaluate(sess.model, sess.tokenizer, sess.mem, records)
    row = {k: v for k, v in report.to_dict().items() if k != "edits"}
    parts = [row[k] for k in ("reliability", "generalization", "locality") if row[k] is not None]
    row.update(T=t, avg=sum(parts) / len(parts), seconds_per_edit=seconds / len(records),
               memories=sess.mem.n_memories, base_perplexity=base_ppl,
               mean_steps_per_shard=sum(steps.values()) / max(len(steps), 1))
    return row


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
    ap.add_argument("--mode", default="merge", choices=["merge", "retrieve"])
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
          f"{'base-ppl':>9} {'s/edit':>7}")
    for t in args.T:
        row = run_once(args, t)
        rows.append(row)
        print(f"{t:>6} {_f(row['reliability'])} {_f(row['generalization'])} {_f(row['locality'])} "
              f"{_f(row['generated_accuracy'], 8)} {_f(row['avg'])} {_f(row['perplexity'], 8)} "
              f"{_f(row['base_perplexity'], 9)} {row['seconds_per_edit']:>7.2f}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"quality-{Path(args.dataset).stem}-{Path(args.model).name}-{args.mode}" + \
        (f"-from{args.offset}" if args.offset else "") + \
        ("" if args.negatives == "generated" else f"-neg-{Path(args.negatives).stem}")
    (out / f"{name}.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2) + "\n")
    plot(rows, out / f"{name}.png", name)
    print(f"wrote {out / name}.json and .png")


if __name__ == "__main__":
    main()
