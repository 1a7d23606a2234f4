"""Teacher scores for the distillation loss: an off-the-shelf embedder scores each training
example's positives and negatives once, into the training file (`build-train ... --teacher`).

The teacher's query is the example's human rewrite when its source has one (`metadata["rewrite"]`:
iKAT, CAsT, QReCC, any session with a `rewrite`; TopiOCQA has none), else every user turn joined
newest first. The loss that reads the scores is `modeling.losses.score_distillation_loss` (wired in
`train.py`, weight in the recipe).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from chatretriever.io.training import TeacherScores, TrainingExample
from chatretriever.retrieval.encoders import Encoder, fingerprint_of
from chatretriever.retrieval.search import join_turns, joins_newest_first
from chatretriever.types import Passage, Session, Turn


def teacher_query(example: TrainingExample, newest_first: bool = True) -> tuple[str, str]:
    """The teacher's query of an example: its human rewrite when the source has one, else every
    user turn joined (`search.join_turns`: newest first, or oldest first for a teacher that
    keeps the end of a long text, `search.joins_newest_first`). Returns (text,
    "rewrite"|"user_turns")."""
    rewrite = example.metadata.get("rewrite")
    if isinstance(rewrite, str) and rewrite.strip():
        return rewrite, "rewrite"
    return join_turns([t for t in example.messages if t.role == "user"], newest_first), "user_turns"


def add_teacher_scores(
    examples: Sequence[TrainingExample],
    teacher: Encoder,
    batch_size: int = 64,
    show_progress: bool = True,
) -> list[TrainingExample]:
    """Score each example's positives and negatives with an off-the-shelf embedder, once.

    The query is `teacher_query`; scores are dot products of the teacher's embeddings (cosines
    for normalised ones). Distinct passage texts are encoded once.

    Args:
        examples: The examples (with their final negatives: mining after this drops the scores).
        teacher: Any `Encoder` (e.g. `TextEmbedder` "mpnet-base", "minilm-l6").
        batch_size: Texts per encoder call.
        show_progress: Show progress bars.

    Returns:
        The examples with `teacher` set, same order.
    """
    texts: dict[tuple[str, str], int] = {}
    for ex in examples:
        for p in (*ex.positives, *ex.negatives):
            texts.setdefault((p.title, p.text), len(texts))
    passages = [Passage(str(i), text, title) for (title, text), i in texts.items()]
    newest_first = joins_newest_first(teacher)  # an LLM teacher reads the question last
    queries = [teacher_query(ex, newest_first) for ex in examples]
    sessions = [
        Session(ex.id, (Turn("user", q),)) for ex, (q, _) in zip(examples, queries, strict=True)
    ]
    p_emb = teacher.encode_passages(passages, batch_size, show_progress)  # (P, D)
    q_emb = teacher.encode_sessions(sessions, batch_size, show_progress)  # (B, D)
    name = f"{teacher.name}@{fingerprint_of(teacher) or 'unknown'}"
    out = []
    for ex, q, (_, mode) in zip(examples, q_emb, queries, strict=True):
        pos, neg = (
            tuple(float(p_emb[texts[(p.title, p.text)]] @ q) for p in ps)  # (D,) @ (D,)
            for ps in (ex.positives, ex.negatives)
        )
        out.append(replace(ex, teacher=TeacherScores(name, pos, neg, mode)))
    return out
