"""BM25 hard negatives for training examples: sampled from a rank window, never a known positive.

Mined over a corpus (per domain where examples carry one) or, without one, over the pool of every
example's positives.
"""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

from chatretriever.io.training import TrainingExample, TrainingPassage
from chatretriever.retrieval.bm25 import BM25Config, BM25Retriever
from chatretriever.retrieval.search import join_turns
from chatretriever.types import Passage, Turn, passage_text

logger = logging.getLogger(__name__)

MINING_QUERIES = ("last_turn", "user_turns", "all_turns")


@dataclass(frozen=True)
class MiningConfig:
    """How BM25 hard negatives are mined.

    Attributes:
        num_negatives: Negatives added per example.
        rank_window: 1-based inclusive ranks to sample from (the paper uses 15-30), counted
            after positives and duplicate texts are removed from the ranking.
        seed: Sampling seed; each example's draw depends only on (seed, example id).
        query: "last_turn", "user_turns" (the last user turn, then the earlier ones, newest
            first) or "all_turns" (every turn, newest first).
        max_query_chars: Queries are cut to this many characters.
        bm25: The BM25 settings: the baselines' (`retrieval.baselines.BM25Config`).
    """

    num_negatives: int = 4
    rank_window: tuple[int, int] = (15, 30)
    seed: int = 0
    query: str = "user_turns"
    max_query_chars: int = 2000
    bm25: BM25Config = field(default_factory=BM25Config)

    def __post_init__(self) -> None:
        lo, hi = self.rank_window
        if not 1 <= lo <= hi:
            raise ValueError(f"rank_window must be 1 <= start <= end, got {self.rank_window}")
        if self.num_negatives < 0:
            raise ValueError("num_negatives must be >= 0")
        if self.query not in MINING_QUERIES:
            raise ValueError(f"query must be one of {MINING_QUERIES}, got {self.query!r}")


def mining_query(messages: Sequence[Turn], mode: str = "user_turns") -> str:
    """The BM25 query text of a session (see `MiningConfig.query`), newest turn first."""
    if mode == "last_turn":
        return join_turns(messages[-1:])
    if mode == "user_turns":
        return join_turns([t for t in messages if t.role == "user"])
    return join_turns(messages)


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().casefold()


def _passage_pool(
    examples: Sequence[TrainingExample], corpus: Iterable[Passage] | None
) -> list[TrainingPassage]:
    """The corpus (less blank passages) as TrainingPassages, or every distinct positive."""
    if corpus is not None:
        return [TrainingPassage.from_passage(p) for p in corpus if p.text.strip()]
    pool: dict[str, TrainingPassage] = {}
    for ex in examples:
        for p in ex.positives:
            pool.setdefault(_norm(p.text), p)
    return list(pool.values())


def _bm25_topk(
    docs: list[str], queries: list[str], k: int, config: BM25Config, show_progress: bool
) -> list[list[int]]:
    """Per query, the indices of its top-k docs with a positive score, best first, ties broken by
    index (so runs are reproducible): the BM25 of the baselines (`BM25Retriever.top_k`)."""
    bm25 = BM25Retriever.from_texts(docs, config, show_progress=show_progress)
    return [[i for i, _ in row] for row in bm25.top_k(queries, k, show_progress)]


def _pick(candidates: list[int], cfg: MiningConfig, example_id: str) -> list[int]:
    """Sample from the rank window; if it is short, fill with the ranks nearest to it."""
    lo, hi = cfg.rank_window
    window = candidates[lo - 1 : hi]
    rng = random.Random(f"{cfg.seed}:{example_id}")
    chosen = rng.sample(window, min(cfg.num_negatives, len(window)))
    backup = candidates[hi:] + candidates[: lo - 1][::-1]
    chosen += backup[: cfg.num_negatives - len(chosen)]
    order = {c: r for r, c in enumerate(candidates)}
    return sorted(chosen, key=order.__getitem__)


def mine_hard_negatives(
    examples: Sequence[TrainingExample],
    corpus: Iterable[Passage] | None = None,
    config: MiningConfig | None = None,
    show_progress: bool = True,
) -> list[TrainingExample]:
    """Add BM25 hard negatives to each example.

    Each session's query (`config.query`) is searched over `corpus`, or, when there is none,
    over the pool of all examples' distinct positives. Hits with zero score, hits equal to one
    of the example's positives or existing negatives (by id or by whitespace/case-normalized
    text) and repeated texts are dropped; `num_negatives` are then sampled from the rank window
    (filled from the nearest ranks outside it when it is short) and appended to the example's
    negatives.

    Args:
        examples: The examples.
        corpus: Passages to mine from; None mines from the positives.
        config: Mining settings.
        show_progress: Show progress bars.

    Returns:
        New examples (same order) with the negatives added.
    """
    cfg = config or MiningConfig()
    if not examples or cfg.num_negatives == 0:
        return list(examples)
    pool = _passage_pool(examples, corpus)
    if not pool:
        raise ValueError("no passages to mine negatives from")
    docs = [passage_text(p) for p in pool]
    queries = [mining_query(ex.messages, cfg.query)[: cfg.max_query_chars] for ex in examples]
    most_pos = max(len(ex.positives) + len(ex.negatives) for ex in examples)
    k = cfg.rank_window[1] + most_pos + 20  # room for dropped positives and duplicate texts
    logger.info("mining: %d queries over %d passages, top %d", len(queries), len(pool), k)
    hits = _bm25_topk(docs, queries, k, cfg.bm25, show_progress)
    norms = [_norm(p.text) for p in pool]
    out = []
    for ex, row in zip(examples, hits, strict=True):
        known = ex.positives + ex.negatives
        bad_ids = {p.id for p in known if p.id is not None}
        seen = {_norm(p.text) for p in known}
        candidates = []
        for i in row:
            if pool[i].id in bad_ids or norms[i] in seen:
                continue
            seen.add(norms[i])
            candidates.append(i)
        picked = tuple(pool[i] for i in _pick(candidates, cfg, ex.id))
        out.append(replace(ex, negatives=ex.negatives + picked))
    return out


def mine_hard_negatives_by_domain(
    examples: Sequence[TrainingExample],
    corpus: Iterable[Passage],
    config: MiningConfig | None = None,
    show_progress: bool = True,
) -> list[TrainingExample]:
    """`mine_hard_negatives` within each domain: an example whose `metadata["domain"]` is d
    gets negatives only from passages whose `metadata["domain"]` is d (MTRAG retrieves per
    domain, so other domains' passages would be easy negatives). Order is kept."""
    by_domain: dict[object, list[Passage]] = {}
    for p in corpus:
        by_domain.setdefault(p.metadata.get("domain"), []).append(p)
    mined: dict[str, TrainingExample] = {}
    for domain in sorted({str(e.metadata.get("domain")) for e in examples}):
        group = [e for e in examples if str(e.metadata.get("domain")) == domain]
        passages = by_domain.get(domain, [])
        if not passages:
            logger.warning(
                "no passages of domain %r: %d examples get no negatives", domain, len(group)
            )
            continue
        for e in mine_hard_negatives(group, passages, config, show_progress):
            mined[e.id] = e
    return [mined.get(e.id, e) for e in examples]
