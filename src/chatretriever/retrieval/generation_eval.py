"""Score generated answers against reference responses: SQuAD token F1 and ROUGE-L, their means,
and whether answers are better when retrieval found a relevant passage. Torch-free.

The answers file format lives in `chatretriever.io.answers`.
"""

from __future__ import annotations

import functools
import logging
import re
import string
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from chatretriever.errors import require_extra
from chatretriever.types import Run, rank_key

logger = logging.getLogger(__name__)

METRICS = ("f1", "rouge_l")
_SHOWN_IDS = 5  # qids named in an error message
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(s: str) -> str:
    """SQuAD normalisation: lowercase, no punctuation, no articles (a/an/the), single spaces."""
    return " ".join(_ARTICLES.sub(" ", s.lower().translate(_PUNCT)).split())


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD token F1 of the normalised answers (common tokens counted as a multiset).

    Returns:
        F1 in [0, 1]; 1.0 when both are empty after normalisation, 0.0 when one of them is.
    """
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


@functools.lru_cache(maxsize=1)
def _rouge_l_scorer() -> Any:
    require_extra("rouge_score", purpose="ROUGE-L")
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (longest common subsequence of tokens, Porter-stemmed), `rouge-score`.

    Returns:
        F-measure in [0, 1] (0.0 when either text has no tokens).
    """
    return float(_rouge_l_scorer().score(reference, prediction)["rougeL"].fmeasure)


@dataclass(frozen=True)
class GenerationScores:
    """The scores of one answer (the best over its references)."""

    f1: float
    rouge_l: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def score_answer(prediction: str, references: str | Sequence[str]) -> GenerationScores:
    """Score one answer; with several references each metric takes its best one.

    Args:
        prediction: The generated answer.
        references: One reference response or several (at least one).

    Returns:
        The answer's scores.
    """
    refs = [references] if isinstance(references, str) else list(references)
    if not refs:
        raise ValueError("score_answer needs at least one reference")
    return GenerationScores(
        f1=max(token_f1(prediction, r) for r in refs),
        rouge_l=max(rouge_l(prediction, r) for r in refs),
    )


def _some(ids: Iterable[str]) -> str:
    """A few ids and the count: "'a', 'b', ... (12 in all)"."""
    ids = sorted(ids)
    shown = ", ".join(repr(i) for i in ids[:_SHOWN_IDS])
    return f"{shown}{', ...' if len(ids) > _SHOWN_IDS else ''} ({len(ids)} in all)"


def score_answers(
    answers: Mapping[str, str], references: Mapping[str, str | Sequence[str]]
) -> dict[str, dict[str, float]]:
    """Score every referenced turn's answer.

    The references define the scored turns: each needs an answer (a missing one raises rather
    than silently raising the mean); answers without a reference are skipped (logged).

    Args:
        answers: qid -> generated answer.
        references: qid -> reference response, or several (each metric takes the best).

    Returns:
        qid -> {"f1", "rouge_l"}, in the order of `references`.
    """
    missing = [q for q in references if q not in answers]
    if missing:
        raise ValueError(f"no answer for {len(missing)} referenced turns: {_some(missing)}")
    extra = [q for q in answers if q not in references]
    if extra:
        logger.info("%d answers have no reference and are not scored: %s", len(extra), _some(extra))
    out = {}
    for qid, refs in references.items():
        try:
            out[qid] = score_answer(answers[qid], refs).to_dict()
        except ValueError as e:
            raise ValueError(f"turn {qid!r}: {e}") from None
    return out


def _means(scores: Sequence[Mapping[str, float]]) -> dict[str, Any]:
    """{"n", "f1", "rouge_l"}: the count and the means (None for no scores)."""
    out: dict[str, Any] = {"n": len(scores)}
    for name in METRICS:
        out[name] = sum(s[name] for s in scores) / len(scores) if scores else None
    return out


def summarize(gen_scores: Mapping[str, Mapping[str, float]]) -> dict[str, Any]:
    """Means over turns.

    Args:
        gen_scores: qid -> {"f1", "rouge_l"} (`score_answers`).

    Returns:
        {"f1": mean, "rouge_l": mean, "n": number of turns}; the means are None for no turns.
    """
    return _means(list(gen_scores.values()))


def _hit(docs: Mapping[str, float], judged: Mapping[str, int], k: int) -> bool:
    """Whether a document with relevance > 0 is in the top k, ties broken by (-score, docid)."""
    top = sorted(docs.items(), key=lambda kv: rank_key(kv[0], kv[1]))[:k]
    return any(judged.get(doc, 0) > 0 for doc, _ in top)


def consistency(
    gen_scores: Mapping[str, Mapping[str, float]],
    run: Mapping[str, Mapping[str, float]] | Run,
    qrels: Mapping[str, Mapping[str, int]],
    k: int = 3,
) -> dict[str, Any]:
    """Answer quality when retrieval found a relevant passage in the top k ("hit") or not.

    A faithful grounded generator answers better on hits; the F1 gap measures how much.

    Args:
        gen_scores: qid -> {"f1", "rouge_l"} (`score_answers`).
        run: qid -> docid -> score (or a `Run`); a turn missing from it is a miss.
        qrels: qid -> docid -> relevance; a turn without judgments is a miss.
        k: The rank cut-off.

    Returns:
        {"k", "hit": {"n", "f1", "rouge_l"}, "miss": {...}, "gap_f1": hit f1 - miss f1}; means
        and the gap are None for an empty group.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    scores = run.scores if isinstance(run, Run) else run
    groups: dict[bool, list[Mapping[str, float]]] = {True: [], False: []}
    for qid, s in gen_scores.items():
        groups[_hit(scores.get(qid, {}), qrels.get(qid, {}), k)].append(s)
    hit, miss = _means(groups[True]), _means(groups[False])
    gap = None if hit["f1"] is None or miss["f1"] is None else hit["f1"] - miss["f1"]
    return {"k": k, "hit": hit, "miss": miss, "gap_f1": gap}
