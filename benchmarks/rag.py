"""MTRAG-UN retrieval-augmented generation: retrieval and grounded answers of each system.

Every evaluated turn (held-out conversations of configs/mtrag-un-heldout.txt, with a reference
response) is answered by each system from its top k passages. Retrieval: nDCG@3 and R@10 over the
judged turns (`chatretriever.retrieval.evaluate`); generation: token F1 and ROUGE-L against the
reference response; consistency: F1 on the judged turns whose top k holds a relevant passage
("hit") vs the others ("miss").

Systems (`--systems`, each optional):
    uniconv                 `--uniconv DIR` retrieves and answers with itself
    decoupled               `--retriever` (ChatRetriever) retrieves, `--generator` answers
    bm25                    BM25 on the last turn retrieves, `--generator` answers
    closed-book             `--generator` answers without passages
    oracle                  `--generator` answers from the judged-relevant passages (qrels)
    retriever-as-generator  `--retriever`'s own causal LM (LoRA merged) answers from its passages
    `--ablation NAME=DIR`   more UniConv rows (repeatable); each is also compared, paired, with
                            the row it ablates (`--ablation-baseline ID`, default uniconv)

`--pool P` searches a pooled corpus: every passage judged for an evaluated turn plus BM25's top P
of each turn on the full corpus (encoding all 38k passages with an LLM takes ~35 min on a 2-core
CPU); the results then say so, with the pool's size. Runs, embeddings and answers are cached under
--out, keyed by what made them, so a rerun costs nothing.

    python benchmarks/rag.py --limit 40 --pool 20 --systems decoupled bm25 closed-book oracle
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from chatretriever.apps.chat import top_passages
from chatretriever.io.mtrag import load_mtrag
from chatretriever.io.trec import read_run
from chatretriever.retrieval.evaluate import write_json
from chatretriever.retrieval.search import save_run, search_dense
from chatretriever.types import Run, qrels_to_dict

# The helper package of benchmarks/conversational.py, beside this script (see that script).
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _conversational import backends, runs, script, tasks  # noqa: E402
from _conversational.pool import ids_sha, pool_ids  # noqa: E402, F401  (pool_ids: this script's surface)
from _conversational.systems import parse_model  # noqa: E402
from _rag.answers import answers_of  # noqa: E402
from _rag.evaluation import BASELINE_ROW, evaluate_system, paired_tests  # noqa: E402
from _rag.report import (  # noqa: E402
    ablation_table,  # noqa: E402, F401  (part of this script's surface)
    corpus_line,
    results_table,  # noqa: E402, F401  (part of this script's surface)
    write_markdown,
    write_plot,
)
from _rag.systems import SYSTEMS, RagSystem, describe, plan_systems  # noqa: E402
from _rag.turns import load_corpus, select_turns  # noqa: E402
from _rag.workspace import RagWorkspace  # noqa: E402
from _shared.machine import machine  # noqa: E402
from _shared.paths import keep_previous, repo_path, run_settings  # noqa: E402

RUN_DEPTH = 10  # R@10 reads the top 10 of a run whatever k the answers read


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--data", default=repo_path("../shared/data/mtrag"), help="the MTRAG directory")
    p.add_argument("--out", default=repo_path("outputs/rag"), help="output directory (and caches)")
    p.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    p.add_argument("--uniconv", metavar="DIR", help="the UniConv of the `uniconv` row")
    p.add_argument("--ablation", action="append", default=[], metavar="NAME=DIR")
    p.add_argument(
        "--ablation-baseline",
        default="uniconv",
        metavar="ID",
        help="the row each --ablation row is also compared with (paired): the model it ablates",
    )
    p.add_argument("--retriever", default="chatretriever-smol", help="retriever of `decoupled`")
    p.add_argument("--generator", default="smollm2-135m-instruct", help="chat LLM that answers")
    p.add_argument(
        "--gen-dtype",
        default="float32",
        help="weights of --generator: float32 (the README table's), bf16, or auto (bf16 where "
        "the device runs it natively: about half the time per answer on an AVX512-BF16 CPU)",
    )
    p.add_argument(
        "--eval-conversations",
        default=repo_path("configs/mtrag-un-heldout.txt"),
        help="conversation ids to evaluate ('' = every conversation)",
    )
    p.add_argument("--limit", type=int, default=0, help="N turns: the lowest sha1 of id (0: all)")
    p.add_argument("--k", type=int, default=3, help="passages each answer reads")
    p.add_argument("--pool", type=int, default=0, help="pooled corpus with BM25's top P (0: off)")
    p.add_argument("--max-new-tokens", type=int, default=96, help="longest answer, in tokens")
    p.add_argument("--gen-batch-size", type=int, default=8, help="prompts per generation call")
    p.add_argument("--batch-size", type=int, default=32, help="passages per encoder call")
    p.add_argument("--query-batch-size", type=int, default=16, help="sessions per encoder call")
    p.add_argument("--chunk-size", type=int, default=2000, help="passages per embedding chunk")
    p.add_argument("--device", help="cpu, cuda, ... (default: the accelerator, else cpu)")
    p.add_argument("-v", "--verbose", action="store_true", help="log library messages (INFO)")
    args = p.parse_args(argv)
    for name in ("k", "max_new_tokens", "gen_batch_size", "batch_size", "query_batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if args.limit < 0 or args.pool < 0:
        p.error("--limit and --pool must be at least 0")
    args.rewrite_model = None  # read by the shared Workspace, unused here
    return args


# -------------------------------------------------------------------------------- retrieval
def retrieval_run(system: RagSystem, ws: RagWorkspace, corpus_tag: str) -> tuple[Run | None, dict]:
    """The system's run over the evaluated turns (cached under OUT/runs/), and its settings."""
    if system.retrieval == "none":
        return None, {}
    if system.retrieval == "oracle":
        return oracle_run(ws.judged, [s.id for s in ws.sessions]), {}
    run_path = ws.out / "runs" / f"{system.run_id}.{corpus_tag}.trec"
    key = {
        "run": system.run_id,
        "retriever": ws.fingerprint(system.retriever) if system.retriever else "bm25",
        "corpus": corpus_tag,
        "depth": RUN_DEPTH,
        "queries_sha1": ids_sha(s.id for s in ws.sessions),
    }
    settings = runs.cached_settings(run_path, key)
    if settings is None:
        timing = {}
        if system.retrieval == "dense":
            index, timing = ws.index(system.retriever, f"{system.label}.{corpus_tag}")
            encoder = ws.encoder(system.retriever)
            start = time.perf_counter()
            run = search_dense(
                encoder, index, ws.sessions, RUN_DEPTH, batch_size=ws.args.query_batch_size
            )
        else:
            retriever, timing["index_s"] = ws.bm25()
            start = time.perf_counter()
            run = retriever.search(ws.sessions, RUN_DEPTH, "last_turn")
        timing = {**timing, "query_s": time.perf_counter() - start}
        settings = {"key": key, "wall_s": round(sum(timing.values()), 3), "timing_s": timing}
        save_run(run_path, run, settings, depth=RUN_DEPTH)
    return Run(read_run(run_path).scores, name=system.run_id), {"run": str(run_path), **settings}


def oracle_run(judged: Mapping[str, Mapping[str, int]], qids: Iterable[str]) -> Run:
    """The judged-relevant passages (rel > 0) of each turn as a run, most relevant first."""
    scores = {q: {d: float(r) for d, r in judged.get(q, {}).items() if r > 0} for q in qids}
    return Run(scores, name="oracle")


# ------------------------------------------------------------------------------------ main
def run_system(system: RagSystem, ws: RagWorkspace, corpus_tag: str) -> dict[str, Any]:
    run, run_settings = retrieval_run(system, ws, corpus_tag)
    no_run = Run({s.id: {} for s in ws.sessions})
    passages = top_passages(run or no_run, {p.id: p for p in ws.passages}, ws.args.k)
    answers, answer_settings = answers_of(system, ws, passages)
    record = {"id": system.id, **asdict(system), "description": describe(system, ws.args.k)}
    record.update(evaluate_system(system, run, answers, ws))
    record.update(run=run_settings or None, answers=answer_settings)
    return record


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    data = load_mtrag(args.data)
    if data.corpus_path is None:
        raise SystemExit(f"{args.data}: no corpus.jsonl(.gz) beside the tasks")
    convs = tasks.read_conversations(args.eval_conversations) if args.eval_conversations else None
    turns = select_turns(data.sessions, convs, args.limit)
    if not turns:
        raise SystemExit("no turn to evaluate")
    qids = {s.id for s in turns}
    judged = {q: d for q, d in qrels_to_dict(data.qrels).items() if q in qids}
    planned, skipped = plan_systems(args)
    for s in skipped:
        print(f"skip {s['system']}: {s['reason']}")
    if not planned:  # an empty table would replace (and move aside) a real result
        raise SystemExit("no system to run (see the skip lines above)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    passages, corpus = load_corpus(args, data.corpus_path, turns, judged)
    print(
        f"MTRAG-UN RAG: {len(turns)} turns, {len(judged)} judged. {corpus_line(corpus, len(turns))}"
    )
    if not judged:
        print("  no judged turn among them: retrieval columns are '-' (generation is scored)")
    ws = RagWorkspace(args, turns, passages, judged, data.corpus_path)
    records = []
    try:
        for n, system in enumerate(planned, start=1):
            print(f"[{n}/{len(planned)}] {system.id}: {describe(system, args.k)}")
            records.append(run_system(system, ws, corpus["tag"]))
            backends.release_memory()
    except KeyboardInterrupt:
        print(
            f"interrupted: the answers so far are kept in {out / 'answers'}; rerun to resume",
            file=sys.stderr,
        )
        return script.INTERRUPTED
    summary = {
        "command": shlex.join(["python", "benchmarks/rag.py", *argv]),
        "data": args.data,
        "eval_conversations": args.eval_conversations,
        "limit": args.limit,
        "turns": len(turns),
        "k": args.k,
        "max_new_tokens": args.max_new_tokens,
        "gen_dtype": args.gen_dtype,
        "machine": machine(ws.gen_dtype()),
        "corpus": corpus,
        "skipped": skipped,
    }
    summary["paired_against"] = paired_tests(records, BASELINE_ROW)
    ablations = {parse_model(text)[0] for text in args.ablation}
    summary["ablations_against"] = (
        paired_tests(records, args.ablation_baseline, "paired_ablation", ablations)
        if ablations
        else None
    )
    if ablations and summary["ablations_against"] is None:  # the baseline row was skipped
        print(f"  no ablation comparison: row {args.ablation_baseline!r} was not run")
    summary["settings"] = run_settings(args, "verbose")
    keep_previous([out / f"rag.{ext}" for ext in ("json", "md", "png")], summary["settings"])
    write_json(out / "rag.json", {**summary, "systems": records})
    print(write_markdown(out / "rag.md", summary, records))
    write_plot(out / "rag.png", records)
    print(f"-> {out / 'rag'}.{{json,md,png}}")
    return 0


if __name__ == "__main__":
    script.run(main)
