"""Both modifications for several systems: nDCG@3, Diff; Mean and SD; artefacts on disk.

Writes the modified datasets as sessions JSONL (atomically) so they can be reused:
OUT/full.seed<N>.jsonl (shared by every system) and OUT/partial.<system>.jsonl (one replay
per system: its responses depend on what it retrieved).
"""

from __future__ import annotations

import logging
import re
import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from chatretriever.io.sessions import write_sessions
from chatretriever.retrieval.robustness.conversations import group_conversations
from chatretriever.retrieval.robustness.full import N_CONTEXTS, FullResult, full_modification
from chatretriever.retrieval.robustness.generation import RobustnessLLM
from chatretriever.retrieval.robustness.partial import (
    Retrieve,
    Standalone,
    llm_standalone,
    partial_modification,
)
from chatretriever.retrieval.robustness.prompts import RobustnessPrompts
from chatretriever.types import Qrel, Run, Session

logger = logging.getLogger(__name__)

MEASURE = "nDCG@3"


def ndcg3(run: Run, qrels: Sequence[Qrel], sessions: Sequence[Session]) -> float:
    """Mean nDCG@3 of a run over the judged sessions (a session missing from the run counts 0)."""
    from chatretriever.retrieval.evaluate import evaluate_run

    ids = {s.id for s in sessions}
    judged = [q for q in qrels if q.query_id in ids]
    if not judged:
        raise ValueError("none of the sessions has a judgment")
    return float(evaluate_run(run, judged, [MEASURE]).aggregate[MEASURE])


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "system"


def evaluate_robustness(
    systems: Mapping[str, Retrieve],
    sessions: Sequence[Session],
    qrels: Sequence[Qrel],
    passages: Mapping[str, str],
    llm: RobustnessLLM,
    out: str | Path,
    n_contexts: int = N_CONTEXTS,
    standalone: Standalone | None = None,
    prompts: RobustnessPrompts | None = None,
    modes: Sequence[str] = ("partial", "full"),
) -> dict[str, Any]:
    """Evaluate every system on the original, partially and fully modified conversations.

    Args:
        systems: Name -> system under test (sessions -> run).
        sessions: The dataset's evaluated turns (each with its full history).
        qrels: Their judgments.
        passages: Passage id -> text (the response prompt's top passages).
        llm: The generator of responses, verdicts, rewrites and contexts (cached).
        out: Directory of the modified datasets.
        n_contexts: Context sets of the full modification.
        standalone: Standalone forms where the dataset has no rewrite (default: LLM rewrite).
        prompts: The templates.
        modes: Which modifications to run ("partial", "full").

    Returns:
        {"systems": {name: {original, partial: {nDCG@3, diff, query_forms}, full: {mean, sd,
        per_seed}, seconds}}, "full_fallbacks", "llm": the LLM's counts}; the full SD is None
        with one context set.

    Raises:
        ValueError: The qrels judge none of the sessions (before any generation).
    """
    out = Path(out)
    prompts = prompts or RobustnessPrompts()
    standalone = standalone or llm_standalone(llm)
    # Every system's original run first: qrels that judge none of the sessions, or a system that
    # fails, stop the evaluation before the first (slow) generation, not after all of them.
    results: dict[str, Any] = {}
    for name, retrieve in systems.items():
        start = time.perf_counter()
        results[name] = {"original": ndcg3(retrieve(sessions), qrels, sessions)}
        results[name]["seconds"] = time.perf_counter() - start
    full: FullResult | None = None
    if "full" in modes:
        full = full_modification(sessions, llm, standalone, prompts, n_contexts)
        for seed, contexts in zip(full.seeds, full.context_sets, strict=True):
            write_sessions(out / f"full.seed{seed}.jsonl", contexts)
    conversations = group_conversations(sessions) if "partial" in modes else []
    for name, retrieve in systems.items():
        start = time.perf_counter() - results[name].pop("seconds")
        row: dict[str, Any] = results[name]
        if conversations:
            part = partial_modification(
                conversations, retrieve, passages, llm, standalone, prompts, name=name
            )
            write_sessions(out / f"partial.{_slug(name)}.jsonl", part.sessions)
            value = ndcg3(part.run, qrels, part.sessions)
            row["partial"] = {
                MEASURE: value,
                "diff": abs(value - row["original"]),
                "query_forms": part.forms,
            }
        if full is not None:
            per_seed = [ndcg3(retrieve(c), qrels, c) for c in full.context_sets]
            row["full"] = {
                "mean": statistics.fmean(per_seed),
                # sample SD over the context sets (n - 1): the sets are draws of one generator;
                # one set has no SD (None), which must not read as perfectly stable (0.0)
                "sd": statistics.stdev(per_seed) if len(per_seed) > 1 else None,
                "per_seed": dict(zip(map(str, full.seeds), per_seed, strict=True)),
            }
        row["seconds"] = round(time.perf_counter() - start, 3)
        results[name] = row
        logger.info("%s: %s", name, row)
    return {
        "systems": results,
        "full_fallbacks": full.fallbacks if full else [],
        "llm": {"model": llm.model, "prompts": prompts.hash, **llm.stats.to_dict()},
    }
