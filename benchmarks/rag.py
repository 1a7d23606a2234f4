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
import copy
import logging
import shlex
import sys
import time
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from chatretriever.apps.chat import top_passages
from chatretriever.io.mtrag import load_mtrag
from chatretriever.io.trec import read_run
from chatretriever.retrieval.evaluate import write_json
from chatretriever.retrieval.search import save_run, search_dense
from chatretriever.types import Passage, Run, Session, qrels_to_dict

# The helper package of benchmarks/conversational.py, beside this script (see that script).
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _conversational import backends, runs, script, tasks  # noqa: E402
from _conversational.pool import ids_sha, pool_ids  # noqa: E402, F401  (pool_ids: this script's surface)
from _conversational.systems import missing_model, parse_model, slug  # noqa: E402
from _rag.answers import answers_of  # noqa: E402
from _rag.report import (  # noqa: E402
    MEASURES,
    ablation_table,  # noqa: E402, F401  (part of this script's surface)
    corpus_line,
    results_table,  # noqa: E402, F401  (part of this script's surface)
    write_markdown,
    write_plot,
)
from _rag.turns import load_corpus, select_turns  # noqa: E402
from _shared.machine import machine  # noqa: E402
from _shared.paths import keep_previous, repo_path  # noqa: E402

SYSTEMS = ("uniconv", "decoupled", "bm25", "closed-book", "oracle", "retriever-as-generator")
RUN_DEPTH = 10  # R@10 reads the top 10 of a run whatever k the answers read


@dataclass(frozen=True)
class RagSystem:
    """One row of the table: how it retrieves and what answers.

    Attributes:
        id: Row name (also the answers file name).
        retrieval: "dense", "bm25", "oracle" (the judged-relevant passages) or "none".
        retriever: The dense retriever's model spec (`registry.load_encoder`), else None.
        label: The retriever's name in file names ("uniconv", "chatretriever-smol", ...).
        answerer: "self" (the retriever answers: UniConv), "llm" (`generator` behind a
            `GroundedGenerator`) or "retriever-lm" (the retriever's own causal LM).
        generator: The chat LLM of "llm", else None.
    """

    id: str
    retrieval: str
    retriever: str | None
    label: str
    answerer: str
    generator: str | None = None

    @property
    def run_id(self) -> str | None:
        """The cached run's name (systems retrieving alike share it), None without a run."""
        if self.retrieval == "dense":
            return slug(f"{self.label}.session")
        return "bm25.last_turn" if self.retrieval == "bm25" else None


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


def plan_systems(args: argparse.Namespace) -> tuple[list[RagSystem], list[dict[str, str]]]:
    """The rows to run, in table order, and the ones skipped with the reason."""
    out: list[RagSystem] = []
    skipped: list[dict[str, str]] = []
    chosen = set(args.systems)
    label, spec = parse_model(args.retriever)
    gen = args.generator
    if "uniconv" in chosen:
        if args.uniconv:
            out.append(RagSystem("uniconv", "dense", args.uniconv, "uniconv", "self"))
        else:
            skipped.append({"system": "uniconv", "reason": "no --uniconv DIR given"})
    plain = {
        "decoupled": RagSystem("decoupled", "dense", spec, label, "llm", gen),
        "bm25": RagSystem("bm25", "bm25", None, "bm25", "llm", gen),
        "closed-book": RagSystem("closed-book", "none", None, "", "llm", gen),
        "oracle": RagSystem("oracle", "oracle", None, "oracle", "llm", gen),
        "retriever-as-generator": RagSystem(
            "retriever-as-generator", "dense", spec, label, "retriever-lm"
        ),
    }
    out += [system for name, system in plain.items() if name in chosen]
    for text in args.ablation:
        name, sep, path = text.partition("=")
        if not (sep and name.strip() and path.strip()):
            raise ValueError(f"--ablation {text!r}: expected NAME=DIR")
        name, path = parse_model(text)
        out.append(RagSystem(name, "dense", path, name, "self"))
    kept = []
    for system in out:
        why = next(filter(None, (missing_model(m) for m in _models(system))), None)
        if why:
            skipped.append({"system": system.id, "reason": why})
        else:
            kept.append(system)
    ids = [s.id for s in kept]
    if len(set(ids)) != len(ids):
        raise ValueError(f"two systems share a name: {ids}; give each --ablation its own NAME")
    rows = [*ids, *(s["system"] for s in skipped)]
    if args.ablation and args.ablation_baseline not in rows:
        raise ValueError(
            f"--ablation-baseline {args.ablation_baseline!r} is none of the rows {rows}"
        )
    return kept, skipped


def _models(system: RagSystem) -> list[str]:
    return [m for m in (system.retriever, system.generator) if m]


# ------------------------------------------------------------------------------- workspace
class RagWorkspace(runs.Workspace):
    """The shared benchmark workspace (encoders, embeddings, BM25) over the searched passages,
    plus the answering models."""

    def __init__(
        self,
        args: argparse.Namespace,
        turns: list[Session],
        passages: list[Passage],
        judged: Mapping[str, Mapping[str, int]],
        corpus_path: Path,
    ) -> None:
        super().__init__(args, turns, corpus_path)
        self.passages = passages
        self.judged = judged
        self._generators: dict[str, Any] = {}

    def corpus(self) -> list[Passage]:
        return self.passages

    def answering_model(self, system: RagSystem) -> Any:
        """The model that answers for `system` (loaded once per model)."""
        from chatretriever.modeling.grounded import GroundedGenerator

        if system.answerer == "self":
            return self.encoder(system.retriever)
        key = f"{system.answerer}:{system.generator or system.retriever}"
        if key not in self._generators:
            a = self.args
            settings = {"max_new_tokens": a.max_new_tokens, "batch_size": a.gen_batch_size}
            if system.answerer == "llm":
                dtype = self.gen_dtype()
                gen = GroundedGenerator.from_pretrained(
                    system.generator,
                    a.device,
                    dtype=None if dtype == "float32" else dtype,
                    **settings,
                )
            else:  # the retriever's causal LM, LoRA merged into a copy
                retriever = self.encoder(system.retriever)
                model = copy.deepcopy(retriever.model)
                model = model.merge_and_unload() if hasattr(model, "peft_config") else model
                gen = GroundedGenerator(model, retriever.tokenizer, **settings)
            self._generators[key] = gen
        return self._generators[key]

    def gen_dtype(self) -> str:
        """`--gen-dtype` resolved ("auto" -> bf16 or float32 on this device)."""
        from chatretriever.modeling.precision import dtype_name

        return dtype_name(self.args.gen_dtype, self.args.device)

    def answerer_key(self, system: RagSystem) -> dict[str, Any]:
        """What identifies the answering model (cache key of its answers; the dtype is in it
        when it is not float32, so float32 answers cached before the option stay valid)."""
        if system.answerer == "llm":
            key = {"llm": system.generator, "files": runs.files_state(system.generator)}
            dtype = self.gen_dtype()
            return key if dtype == "float32" else {**key, "dtype": dtype}
        return {system.answerer: self.fingerprint(system.retriever)}


# ------------------------------------------------------------------------------ the systems
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


def evaluate_system(
    system: RagSystem, run: Run | None, answers: Mapping[str, str], ws: RagWorkspace
) -> dict[str, Any]:
    """Retrieval metrics (dense and BM25 rows), generation metrics and consistency."""
    from chatretriever.retrieval.evaluate import evaluate_run
    from chatretriever.retrieval.generation_eval import consistency, score_answers, summarize

    scores = score_answers(answers, {s.id: s.response for s in ws.sessions})
    generation = summarize(scores)
    metrics: dict[str, float | None] = dict.fromkeys(MEASURES)
    metrics.update({"F1": generation["f1"], "ROUGE-L": generation["rouge_l"]})
    record: dict[str, Any] = {"metrics": metrics, "n": generation["n"], "consistency": None}
    # per turn, for the paired tests against the baseline row (`paired_tests`)
    record["per_turn"] = {"F1": {q: v["f1"] for q, v in scores.items()}}
    if run is not None and system.retrieval in ("dense", "bm25") and ws.judged:
        ev = evaluate_run(run, ws.judged, MEASURES)
        metrics.update(ev.aggregate)
        record["n_judged"] = ev.num_queries
        record["per_turn"]["nDCG@3"] = {q: v["nDCG@3"] for q, v in ev.per_query.items()}
        judged_scores = {q: v for q, v in scores.items() if q in ws.judged}
        record["consistency"] = consistency(judged_scores, run.scores, ws.judged, ws.args.k)
    return record


def describe(system: RagSystem, k: int) -> str:
    reads = {
        "dense": f"top {k} of {system.label} (whole session)",
        "bm25": f"top {k} of BM25 (last turn)",
        "oracle": f"the judged-relevant passages (at most {k})",
        "none": "no passages",
    }[system.retrieval]
    who = {"self": system.label, "llm": system.generator, "retriever-lm": f"{system.label}'s LM"}
    return f"{who[system.answerer]} answers from {reads}"


BASELINE_ROW = "decoupled"  # the paired tests compare every row with it


def paired_tests(
    records: Sequence[Mapping[str, Any]],
    baseline: str,
    key: str = "paired",
    rows: Collection[str] | None = None,
) -> str | None:
    """Adds to each record (of `rows` ids, default all) `key`: measure -> {"diff", "p", "n"}
    against the baseline row, over the turns both scored (paired randomisation test, 10,000
    sign flips). Returns the baseline's id, or None when it was not run."""
    import numpy as np

    from chatretriever.retrieval.evaluate import randomization_test

    base = next((r for r in records if r["id"] == baseline), None)
    if base is None:
        return None
    for r in records:
        if rows is not None and r["id"] not in rows:
            continue
        r[key] = {}
        for measure, values in r["per_turn"].items():
            other = base["per_turn"].get(measure)
            if r is base or other is None:
                continue
            qids = sorted(set(values) & set(other))
            diff = np.array([values[q] - other[q] for q in qids])
            r[key][measure] = {
                "diff": float(diff.mean()) if qids else 0.0,
                "p": randomization_test(diff),
                "n": len(qids),
            }
    return baseline


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
    summary["settings"] = {k: v for k, v in vars(args).items() if k not in ("out", "verbose")}
    if kept := keep_previous(
        [out / f"rag.{ext}" for ext in ("json", "md", "png")], summary["settings"]
    ):
        print(f"  the results there had other settings: kept as {kept.with_suffix('')}.*")
    write_json(out / "rag.json", {**summary, "systems": records})
    print(write_markdown(out / "rag.md", summary, records))
    write_plot(out / "rag.png", records)
    print(f"-> {out / 'rag'}.{{json,md,png}}")
    return 0


if __name__ == "__main__":
    script.run(main)
