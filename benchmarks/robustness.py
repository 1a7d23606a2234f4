"""Robustness benchmark (ChatRetriever paper, section 4.3, Table 2) on MTRAG-UN or any dataset.

Partial response modification (a chat LLM answers from what each system retrieved, turn by turn;
nDCG@3 and Diff = |modified - original|) and full context modification (LLM-written two-turn
contexts, `--contexts` sets; Mean and SD of nDCG@3) for:
    chatretriever  `--model NAME=DIR_OR_BUILTIN` on the whole session (default chatretriever-smol)
    bm25, dense    BM25 and `--dense` embedders on the last turn and on all user turns
    rewrite        LLM4CS "REW": the generator rewrites, then BM25 and `--rewrite-dense` search
    hybrid         with `--hybrid rrf|linear`: ChatRetriever (and embedders on all user turns)
                   fused with BM25 on `--bm25-formulation`
Systems, corpus embeddings and the BM25 index come from benchmarks/_conversational (the same
workspace as benchmarks/conversational.py: OUT/emb/ is reused). Every generation is cached in
OUT/generations.<generator>.jsonl, so a rerun makes no LLM call; the modified datasets are
OUT/full.seed<N>.jsonl and OUT/partial.<system>.jsonl. Results: OUT/robustness.{json,md,png}
(those of a run with other options kept as OUT/robustness.prev[-N].*).

    python benchmarks/robustness.py --systems bm25 --limit-conversations 2
    python benchmarks/robustness.py --sessions S.jsonl --qrels Q.tsv --corpus C.jsonl
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from chatretriever.errors import MissingExtraError, require_extra
from chatretriever.io.atomic import atomic_path, atomic_write
from chatretriever.retrieval.evaluate import write_json
from chatretriever.retrieval.fusion import DEFAULT_RRF_K, FUSION_METHODS
from chatretriever.retrieval.robustness import systems as rsys
from chatretriever.retrieval.robustness.generation import (
    LazyHFGenerator,
    RobustnessLLM,
    generation_settings,
)
from chatretriever.retrieval.robustness.partial import Retrieve, judge_check
from chatretriever.types import Passage, Run, Session, passage_text

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _conversational import runs, script, systems, tasks  # noqa: E402
from _shared.machine import machine, machine_line  # noqa: E402
from _shared.paths import keep_previous, repo_path, run_settings  # noqa: E402

from chatretriever.retrieval.robustness.evaluation import evaluate_robustness  # noqa: E402

FORMULATIONS = ("last_turn", "all_user_turns")  # the paper's concatenation baselines


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--data", default=repo_path("../shared/data/mtrag"), help="the MTRAG directory")
    p.add_argument("--sessions", help="sessions JSONL instead of MTRAG (with --qrels, --corpus)")
    p.add_argument("--qrels", help="TREC or BEIR qrels of --sessions")
    p.add_argument("--corpus", help="BEIR corpus of --sessions")
    p.add_argument("--eval-conversations", default=repo_path("configs/mtrag-un-heldout.txt"))
    p.add_argument("--limit-conversations", type=int, help="only the first N (a timing slice)")
    p.add_argument("--out", default=repo_path("outputs/robustness"), help="output directory")
    p.add_argument("--systems", nargs="+", choices=systems.FAMILIES, default=list(systems.FAMILIES))
    p.add_argument("--dense", nargs="*", default=["minilm-l6"], help="embedders")
    p.add_argument("--only", nargs="+", metavar="ROW", help="only these rows (system names)")
    p.add_argument("--model", action="append", metavar="NAME=DIR_OR_BUILTIN", help="retrievers")
    p.add_argument(
        "--generator", default=systems.REWRITE_MODEL, help="the chat LLM of every prompt"
    )
    p.add_argument("--rewrite-dense", default="minilm-l6", help="embedder run on rewrites")
    p.add_argument("--modes", nargs="+", choices=("partial", "full"), default=["partial", "full"])
    p.add_argument("--contexts", type=int, default=5, help="context sets (full modification)")
    p.add_argument("--max-new-tokens", type=int, default=192, help="of one generation")
    p.add_argument("--temperature", type=float, default=0.7, help="0: greedy")
    p.add_argument("--gen-batch-size", type=int, default=8, help="prompts per LLM forward")
    p.add_argument(
        "--gen-dtype",
        default="auto",
        help="generator weights: auto (bf16 where native, else float32), bf16, float32, ...",
    )
    p.add_argument("--max-retries", type=int, default=2, help="per malformed reply")
    p.add_argument(
        "--judge-check",
        type=int,
        default=60,
        metavar="N",
        help="judge N training turns after their own and another conversation's history (0: off)",
    )
    p.add_argument("--device", help="cpu, cuda, ... (default: the accelerator, else cpu)")
    p.add_argument("--k", type=int, default=100, help="passages per query")
    p.add_argument("--batch-size", type=int, default=64, help="passages per encoder call")
    p.add_argument("--query-batch-size", type=int, default=32, help="queries per encoder call")
    p.add_argument("--chunk-size", type=int, default=5000, help="passages per embedding chunk")
    p.add_argument("--hybrid", nargs="+", choices=FUSION_METHODS, default=["rrf"])
    p.add_argument("--rrf-k", type=int, default=DEFAULT_RRF_K)
    p.add_argument("--fusion-weight", type=float, default=0.5, help="dense weight")
    p.add_argument("--bm25-formulation", choices=FORMULATIONS, default="last_turn")
    p.add_argument("-v", "--verbose", action="store_true", help="log library messages (INFO)")
    args = p.parse_args(argv)
    if args.sessions and not (args.qrels and args.corpus):
        p.error("--sessions needs --qrels and --corpus")
    for name in ("contexts", "max_new_tokens", "gen_batch_size", "k", "limit_conversations"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if not args.temperature >= 0:  # also refuses nan
        p.error(f"--temperature must be 0 (greedy) or more, got {args.temperature}")
    for name in ("judge_check", "max_retries"):  # before any data or LLM loads
        if getattr(args, name) is not None and getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be 0 or more")
    for name in ("batch_size", "query_batch_size", "chunk_size"):
        if getattr(args, name, None) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if getattr(args, "rrf_k", None) is not None and args.rrf_k < 0:
        p.error("--rrf-k must be 0 or more")
    args.model = args.model or ["chatretriever-smol"]
    from chatretriever.modeling.precision import dtype_name

    args.gen_dtype = dtype_name(args.gen_dtype, args.device)  # the cache keys name it
    args.rewrite_model = args.generator  # the workspace's name for it
    return args


def load_data(args: argparse.Namespace) -> tuple[list, list, Path]:
    """(judged sessions, their qrels, corpus path) of MTRAG-UN (held-out) or the given files."""
    if args.sessions:
        from chatretriever.io.sessions import read_sessions
        from chatretriever.io.trec import read_qrels

        sessions, qrels, corpus = read_sessions(args.sessions), read_qrels(args.qrels), args.corpus
    else:
        from chatretriever.io.mtrag import load_mtrag

        data = load_mtrag(args.data)
        if data.corpus_path is None:
            raise SystemExit(f"{args.data}: no corpus.jsonl(.gz) beside the tasks")
        sessions, qrels, corpus = data.sessions, data.qrels, data.corpus_path
        if args.eval_conversations:
            convs = tasks.read_conversations(args.eval_conversations)
            sessions, qrels = tasks.restrict(sessions, qrels, convs, args.eval_conversations)
    judged = {q.query_id for q in qrels}
    sessions = [s for s in sessions if s.id in judged]  # unjudged turns cannot be scored
    if args.limit_conversations:
        keep = first_conversations(sessions, args.limit_conversations)
        sessions = [s for s in sessions if s.id in keep]
    ids = {s.id for s in sessions}
    return sessions, [q for q in qrels if q.query_id in ids], Path(corpus)


def judge_check_sessions(args: argparse.Namespace) -> list[Session]:
    """The turns the judge is checked on: MTRAG's training conversations (those outside
    --eval-conversations), or the given --sessions."""
    if args.sessions:
        from chatretriever.io.sessions import read_sessions

        return read_sessions(args.sessions)
    from chatretriever.io.mtrag import load_mtrag

    held = (
        set(tasks.read_conversations(args.eval_conversations)) if args.eval_conversations else set()
    )
    return [s for s in load_mtrag(args.data).sessions if tasks.conversation_of(s.id) not in held]


def first_conversations(sessions: Sequence[Session], n: int) -> set[str]:
    """Ids of the sessions of the first n conversations (in sorted conversation order)."""
    from chatretriever.retrieval.robustness.conversations import group_conversations

    convs = sorted(group_conversations(sessions), key=lambda c: c.id)[:n]
    return {step.session.id for c in convs for step in c.steps if step.task}


class _Workspace(runs.Workspace):
    """The benchmark workspace; a corpus other than MTRAG's is read as a plain BEIR corpus."""

    def __init__(self, *a, mtrag: bool, **kw) -> None:
        super().__init__(*a, **kw)
        self.mtrag = mtrag

    def corpus(self) -> list[Passage]:
        if self._corpus is None and not self.mtrag:
            from chatretriever.io.corpus import read_corpus

            self._corpus = read_corpus(self.corpus_path)
        return super().corpus()


def make_workspace(args: argparse.Namespace, sessions: list, corpus: Path) -> runs.Workspace:
    return _Workspace(args, sessions, corpus, mtrag=not args.sessions)


def make_llm(args: argparse.Namespace, out: Path) -> tuple[RobustnessLLM, LazyHFGenerator]:
    """The cached generator (its model loads on the first uncached prompt) and its clock."""
    a = args
    timer = LazyHFGenerator(a.generator, a.max_new_tokens, a.temperature, a.device, a.gen_dtype)
    cache = out / f"generations.{systems.slug(args.generator)}.jsonl"
    settings = generation_settings(args.max_new_tokens, args.temperature, args.gen_dtype)
    llm = RobustnessLLM(
        timer, args.generator, cache, args.gen_batch_size, args.max_retries, settings
    )
    return llm, timer


def make_retriever(system: systems.System, ws: runs.Workspace, llm: RobustnessLLM) -> Retrieve:
    """A system of the conversational benchmark as a `Retrieve`; its encoder and corpus index
    are taken from the workspace at each call (it holds one encoder at a time)."""
    args = ws.args
    if system.family == systems.HYBRID:
        dense_formulation = systems.fused_formulation(system)
        base = systems.System("dense", system.retriever, system.label, dense_formulation)
        sparse = rsys.sparse_system(ws.bm25()[0], args.bm25_formulation, args.k)
        fusion = runs.fusion_config(system, args)
        return rsys.hybrid_system(make_retriever(base, ws, llm), sparse, fusion, args.k)
    formulation = "rewrite" if system.family == "rewrite" else system.formulation
    if system.dense:

        def retrieve(sessions: Sequence[Session]) -> Run:
            index, _ = ws.index(system.retriever, system.label)
            encoder = ws.encoder(system.retriever)
            search = rsys.dense_system(encoder, index, formulation, args.k, args.query_batch_size)
            return search(sessions)

    else:
        retrieve = rsys.sparse_system(ws.bm25()[0], formulation, args.k)
    return rsys.rewrite_system(retrieve, llm) if system.family == "rewrite" else retrieve


def passage_texts(ws: runs.Workspace) -> dict[str, str]:
    return {p.id: passage_text(p) for p in ws.corpus()}


def table(summary: dict) -> str:
    """The markdown table of the paper's Table 2 shape (values x 100, as the paper has them)."""
    head = ["system", "original nDCG@3", "partial nDCG@3", "Diff", "full Mean", "full SD"]
    head += ["asked: original / human / LLM rewrite", "s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in summary["systems"].items():
        part, full = r.get("partial", {}), r.get("full", {})
        forms = part.get("query_forms", {})
        cells = [name, f"{100 * r['original']:.1f}"]
        cells += [f"{100 * part[k]:.1f}" if part else "-" for k in ("nDCG@3", "diff")]
        # one context set has no SD (None): "-", not a perfect 0.0
        cells += [
            f"{100 * full[k]:.1f}" if full.get(k) is not None else "-" for k in ("mean", "sd")
        ]
        cells.append(
            " / ".join(str(forms.get(k, 0)) for k in ("original", "human_rewrite", "llm_rewrite"))
            if part
            else "-"
        )
        cells.append(f"{r['seconds']:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def judge_line(check: dict | None) -> str:
    """The judge check in words."""
    if not check:
        return "Judge check: not run."
    if "skipped" in check:
        return f"Judge check skipped: {check['skipped']}."
    return (
        f"Judge check ({check['n']} training turns): unreasonable after the turn's own history "
        f"{check['unreasonable_own']} / {check['n']}, after another conversation's "
        f"{check['unreasonable_other']} / {check['n']}; no verdict {check['no_verdict']}."
    )


def write_results(out: Path, summary: dict) -> str:
    """OUT/robustness.{json,md,png} (those of other settings kept as robustness.prev*);
    returns the markdown."""
    llm = summary["llm"]
    text = "\n".join(
        [
            "# Robustness (ChatRetriever paper, 4.3)",
            "",
            f"{summary['judged_turns']} judged turns; generator {summary['generator']} "
            f"({summary['generation']}); nDCG@3 x 100; SD over {len(summary['full_fallbacks'])} "
            "context sets (sample SD).",
            "",
            machine_line(summary["machine"]) if "machine" in summary else "",
            "",
            table(summary),
            "",
            f"LLM: {llm['generated']} generations and {llm.get('scored', 0)} scored choices "
            f"({summary['generation']['llm_seconds']} s), {llm['cached']} from the cache; "
            f"choices {llm.get('choices', {})}; retries {llm['retries']}, failures "
            f"{llm['failures']} ({llm['malformed_reasons']}); full-context fallbacks per set "
            f"{summary['full_fallbacks']}.",
            "",
            judge_line(summary.get("judge_check")),
            "",
            f"`{summary['command']}`",
            "",
        ]
    )
    files = [out / f"robustness.{ext}" for ext in ("json", "md", "png")]
    keep_previous(files, summary.get("settings", {}))
    write_json(out / "robustness.json", summary)
    with atomic_write(out / "robustness.md") as f:
        f.write(text)
    write_plot(out / "robustness.png", summary)
    return text


def write_plot(path: Path, summary: dict) -> bool:
    """Original, partial and full-mean nDCG@3 per system (SD as error bars)."""
    try:
        matplotlib = require_extra("matplotlib", "plot", "the plot")
        matplotlib.use("Agg")
        plt = require_extra("matplotlib.pyplot", "plot", "the plot")
    except MissingExtraError as e:
        print(f"  no plot: {e}")
        return False
    rows = summary["systems"]
    names = list(rows)
    y = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(8, 1.5 + 0.55 * len(names)))
    bars = [
        ("original", [r["original"] for r in rows.values()], None),
        ("partial", [r.get("partial", {}).get("nDCG@3", 0) for r in rows.values()], None),
        ("full (mean, SD)", [r.get("full", {}).get("mean", 0) for r in rows.values()],
         [r.get("full", {}).get("sd") or 0 for r in rows.values()]),
    ]  # fmt: skip
    for i, (label, values, err) in enumerate(bars):
        ax.barh(y + (i - 1) * 0.27, values, 0.27, xerr=err, label=label)
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    ax.set_xlabel("nDCG@3")
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=3, frameon=False)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)
    return True


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    sessions, qrels, corpus = load_data(args)
    planned, skipped = systems.plan_systems(args, has_rewrites=False)
    planned = [s for s in planned if s.formulation != "full_history"]
    if args.only:
        unknown = sorted(set(args.only) - {s.id for s in planned})
        if unknown:
            raise SystemExit(f"--only: no row {unknown}; rows: {[s.id for s in planned]}")
        planned = [s for s in planned if s.id in args.only]
    for s in skipped:
        print(f"skip {s['system']}: {s['reason']}")
    if not planned:
        raise SystemExit("no system to run (see the skip messages above)")
    out = Path(args.out)
    ws = make_workspace(args, sessions, corpus)
    llm, timer = make_llm(args, out)
    retrievers = {s.id: make_retriever(s, ws, llm) for s in planned}
    passages = passage_texts(ws)
    print(f"{len(sessions)} judged turns, {len(planned)} systems, generator {args.generator}")
    start = time.perf_counter()
    try:
        result = evaluate_robustness(
            retrievers, sessions, qrels, passages, llm, out, args.contexts, modes=args.modes
        )
        check = None
        if args.judge_check:
            try:
                check = judge_check(llm, judge_check_sessions(args), args.judge_check)
            except ValueError as e:  # too few turns with history: the table still stands
                check = {"skipped": str(e)}
    finally:
        llm.close()
    summary = {
        "command": shlex.join(["python", "benchmarks/robustness.py", *argv]),
        "machine": machine(),
        "data": args.sessions or args.data,
        "eval_conversations": None if args.sessions else args.eval_conversations,
        "limit_conversations": args.limit_conversations,
        "judged_turns": len(sessions),
        "generator": args.generator,
        "generation": {
            "max_new_tokens": args.max_new_tokens,
            "temperature": args.temperature,
            "batch_size": args.gen_batch_size,
            "dtype": args.gen_dtype,
            "max_retries": args.max_retries,
            "llm_seconds": round(timer.seconds, 1),
        },
        "wall_s": round(time.perf_counter() - start, 1),
        "skipped": skipped,
        "judge_check": check,
        "settings": run_settings(args, "verbose"),
        **result,
    }
    table = write_results(out, summary)
    print(table)
    print(f"-> {out / 'robustness'}.{{json,md,png}}")
    return 0


if __name__ == "__main__":
    script.run(main)
