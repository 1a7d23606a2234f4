"""Does the encoder path change retrieval? nDCG@3 of one model under several encode_speed rows.

Re-encoding a 38k-passage corpus once per path costs an hour each on a CPU, so this check works
on a POOL: for every evaluated query, the top P passages of a full-corpus run of the model (made
with the default path by `benchmarks/conversational.py`) plus its judged passages. Each row
re-encodes the pool and the sessions and ranks the pool per query. For the path that made the run,
the pooled top 3 equals the full-corpus top 3 by construction; for another path a passage from
outside the pool could only enter its top 3 if its score moved past the pool's, which is what the
cosines of encode_speed.py (>= 0.9998) make implausible at P = 20.

    python benchmarks/encode_retrieval_check.py --data ../shared/data/mtrag \\
        --run outputs/benchmark/runs/chatretriever-smol.session.trec --pool 20 \\
        --rows bf16-budget v1-autocast fast-fp32 --out outputs/encode_check

Writes OUT/encode_check.{json,md}; those of a run with other options are kept as
OUT/encode_check.prev[-N].*.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _conversational import script  # noqa: E402
from _encode_speed.encoder_rows import ROWS, set_row  # noqa: E402
from _shared.machine import machine, machine_line  # noqa: E402
from _shared.paths import keep_previous, repo_path, run_settings  # noqa: E402

from chatretriever.io.atomic import atomic_write  # noqa: E402
from chatretriever.io.corpus import iter_corpus  # noqa: E402
from chatretriever.io.mtrag import load_mtrag  # noqa: E402
from chatretriever.io.trec import read_run  # noqa: E402
from chatretriever.retrieval.evaluate import evaluate_run  # noqa: E402
from chatretriever.types import Run  # noqa: E402


def pool_of(run: Run, qrels: dict[str, dict[str, int]], depth: int) -> dict[str, list[str]]:
    """Query id -> its top `depth` passages of `run` plus its judged passages (sorted ids)."""
    out = {}
    for qid, docs in run.scores.items():
        top = sorted(docs, key=lambda d: (-docs[d], d))[:depth]
        out[qid] = sorted(set(top) | set(qrels.get(qid, {})))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=repo_path("../shared/data/mtrag"))
    p.add_argument("--run", required=True, help="full-corpus TREC run of the model")
    p.add_argument("--model", default="chatretriever-smol")
    p.add_argument("--pool", type=int, default=20)
    p.add_argument(
        "--rows",
        nargs="+",
        choices=sorted(ROWS),
        default=["bf16-budget", "v1-autocast", "fast-fp32"],
    )
    p.add_argument("--out", default=repo_path("outputs/encode_check"))
    args = p.parse_args(argv)
    if args.pool < 1:
        raise ValueError(f"--pool must be at least 1, got {args.pool}")
    if not Path(args.run).is_file():
        raise FileNotFoundError(f"--run {args.run}: no such file")
    from chatretriever import ChatRetriever

    data = load_mtrag(args.data)
    full = read_run(args.run)
    qrels: dict[str, dict[str, int]] = {}
    for q in data.qrels:
        if q.query_id in full.scores:
            qrels.setdefault(q.query_id, {})[q.doc_id] = q.relevance
    pool = pool_of(full, qrels, args.pool)
    wanted = {d for docs in pool.values() for d in docs}
    passages = [x for x in iter_corpus(data.corpus_path) if x.id in wanted]
    index = {x.id: i for i, x in enumerate(passages)}
    sessions = {s.id: s for s in data.sessions if s.id in pool}
    qids = sorted(sessions)
    retriever = ChatRetriever.from_pretrained(args.model, device="cpu")
    run_ndcg = evaluate_run(full, qrels, ["nDCG@3"]).aggregate["nDCG@3"]
    rows = []
    embs = {}
    for row in args.rows:
        set_row(retriever, row)
        pe = retriever.encode_passages(passages, 16, True)  # (P, D)
        qe = retriever.encode_sessions([sessions[q] for q in qids], 16)  # (Q, D)
        embs[row] = pe
        run = Run(
            {q: {d: float(pe[index[d]] @ qe[i]) for d in pool[q]} for i, q in enumerate(qids)}
        )
        ndcg = evaluate_run(run, qrels, ["nDCG@3"]).aggregate["nDCG@3"]
        rows.append({"row": row, "what": ROWS[row][0], "nDCG@3": ndcg})
        print(f"{row}: nDCG@3 {ndcg:.4f}", flush=True)
    ref = embs[args.rows[0]]
    for r in rows:
        cos = np.sum(embs[r["row"]] * ref, axis=1)
        r["cosine_min_vs_first"], r["cosine_mean_vs_first"] = float(cos.min()), float(cos.mean())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "command": shlex.join(["python", "benchmarks/encode_retrieval_check.py", *sys.argv[1:]]),
        "run": args.run,
        "run_nDCG@3": run_ndcg,  # over what the run searched (full corpus or a pool: unchecked)
        "queries": len(qids),
        "judged_queries": len(qrels),
        "pool_passages": len(passages),
        "rows": rows,
        "machine": machine(),
        "settings": run_settings(args),
    }
    keep_previous([out / "encode_check.json", out / "encode_check.md"], result["settings"])
    with atomic_write(out / "encode_check.json") as f:
        json.dump(result, f, indent=2)
    lines = [
        f"Pool: top {args.pool} of `{args.run}` + judged passages = {len(passages)} passages; "
        f"{len(qrels)} judged queries; nDCG@3 of the run itself {run_ndcg:.4f} (over the "
        "corpus it searched: the full corpus only when the run is a full-corpus run).",
        "",
        machine_line(result["machine"]),
        "",
        "| row | encoder path | nDCG@3 (pool) | cosine min / mean vs first row |",
        "|---|---|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['row']} | {r['what']} | {r['nDCG@3']:.4f} | "
            f"{r['cosine_min_vs_first']:.5f} / {r['cosine_mean_vs_first']:.6f} |"
        )
    with atomic_write(out / "encode_check.md") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    script.run(main)
