"""Lifelong-protocol quality benchmark: apply T edits in sequence, then evaluate all of them.

Uses the same readers, editor and metrics as ``wise edit`` / ``wise eval``:

    python benchmarks/quality.py --dataset zsre --T 10 100 --mode merge
    python benchmarks/quality.py --dataset counterfact --T 100 --model gemma3-270m

Prints a table, writes ``benchmarks/results/quality-<dataset>-<model>-<mode>.json`` and a
PNG of the metrics against T.  Development slices only by default (ZsRE records 0-499);
``--offset 500`` evaluates the final-test slice.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from wisecli.config import load_config
from wisecli.edits import load_edits
from wisecli.evaluate import evaluate
from wisecli.session import open_model
from wisecli.wise.editor import WiseEditor

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DATASETS = {
    "zsre": DATA / "zsre" / "zsre_mend_eval.json",
    "counterfact": DATA / "counterfact" / "counterfact-edit.json",
    "knowedit-zsre": DATA / "knowedit" / "benchmark_ZsRE_ZsRE-test-all.json",
}


def run_once(args: argparse.Namespace, t: int) -> dict:
    records = load_edits(DATASETS.get(args.dataset, Path(args.dataset)), offset=args.offset, limit=t)
    sess = open_model(args.model, device=args.device, dtype=args.dtype)
    cfg = load_config(args.config, sess.target.model_type, {"mode": args.mode})
    editor = WiseEditor(sess.model, sess.tokenizer, sess.mem, sess.blocks, sess.target.layer, cfg)
    editor.prepare()
    t0 = time.perf_counter()
    # Lifelong: the edits arrive in batches of edits_per_shard, each applied on top of the last.
    for i in range(0, len(records), args.arrival):
        editor.apply(records[i:i + args.arrival])
    seconds = time.perf_counter() - t0
    report = evaluate(sess.model, sess.tokenizer, sess.mem, records)
    row = {k: v for k, v in report.to_dict().items() if k != "edits"}
    parts = [row[k] for k in ("reliability", "generalization", "locality") if row[k] is not None]
    row.update(T=t, avg=sum(parts) / len(parts), seconds_per_edit=seconds / len(records),
               memories=sess.mem.n_memories)
    return row


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
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    rows = []
    print(f"{'T':>6} {'rel':>6} {'gen':>6} {'loc':>6} {'gen-acc':>8} {'avg':>6} {'s/edit':>7}")
    for t in args.T:
        row = run_once(args, t)
        rows.append(row)
        print(f"{t:>6} {row['reliability']:>6.3f} {row['generalization'] or 0:>6.3f} "
              f"{row['locality'] or 0:>6.3f} {row['generated_accuracy'] or 0:>8.3f} "
              f"{row['avg']:>6.3f} {row['seconds_per_edit']:>7.2f}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"quality-{Path(args.dataset).stem}-{args.model}-{args.mode}"
    (out / f"{name}.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2) + "\n")
    plot(rows, out / f"{name}.png", name)
    print(f"wrote {out / name}.json and .png")


if __name__ == "__main__":
    main()
