"""Which passages a contrastive step scores for each session: the positive of this epoch, the
hard negatives and their `CandidateLayout` (shared by every method that trains an embedder on
the training-file format, `io.training`)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import torch

from chatretriever.config import LossConfig
from chatretriever.io.training import TrainingExample, TrainingPassage, passage_keys
from chatretriever.modeling.collate import csit_batch, encode_batch
from chatretriever.modeling.losses import N_KEYS, CandidateLayout, layout_contrastive_loss


def positive_index(example_id: str, n_positives: int, seed: int, epoch: int) -> int:
    """Which of an example's positives is trained in this epoch: a hash of (seed, epoch, id),
    so every process, worker and resumed run picks the same one, and each epoch picks anew."""
    if n_positives < 1:
        raise ValueError(f"example {example_id!r} has no positive")
    text = f"{seed}\x1f{epoch}\x1f{example_id}".encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "big") % n_positives


def candidate_layout(
    examples: Sequence[TrainingExample], n_negatives: int, seed: int = 0, epoch: int = 0
) -> tuple[list[TrainingPassage], CandidateLayout]:
    """The passages to encode and their `CandidateLayout`.

    Each example contributes the positive `positive_index` picks and its first `n_negatives`
    hard negatives (the builders already sampled them from a rank window); missing negatives
    are padding slots, never encoded, so every process sees the same layout shapes (needed to
    gather across processes). The keys of ALL positives go into the layout.

    Returns:
        (the R passages to encode, in layout row order; the layout).
    """
    b, k = len(examples), n_negatives
    rows = torch.full((b, 1 + k), -1, dtype=torch.long)
    keys = torch.full((b, 1 + k, N_KEYS), -1, dtype=torch.long)
    most = max(len(ex.positives) for ex in examples)
    positive_keys = torch.full((b, most, N_KEYS), -1, dtype=torch.long)
    passages: list[TrainingPassage] = []
    for i, ex in enumerate(examples):
        for j, p in enumerate(ex.positives):
            positive_keys[i, j] = torch.tensor(passage_keys(p, ex.source))
        chosen = ex.positives[positive_index(ex.id, len(ex.positives), seed, epoch)]
        for slot, p in enumerate([chosen, *ex.negatives[:k]]):
            rows[i, slot] = len(passages)
            keys[i, slot] = torch.tensor(passage_keys(p, ex.source))
            passages.append(p)
    return passages, CandidateLayout(rows, keys, positive_keys)


def teacher_slot_scores(
    examples: Sequence[TrainingExample], n_negatives: int, seed: int = 0, epoch: int = 0
) -> torch.Tensor:
    """The teacher's scores of each example's candidate slots, in `candidate_layout`'s order.

    Returns:
        (B, 1 + K) float: slot 0 the score of the positive `positive_index` picks, slots 1..K
        its first K negatives'; NaN for padding slots.

    Raises:
        ValueError: an example has no teacher scores (build them with `--teacher`).
    """
    out = torch.full((len(examples), 1 + n_negatives), float("nan"))
    for i, ex in enumerate(examples):
        if ex.teacher is None:
            raise ValueError(
                f"example {ex.id!r} has no teacher scores: distill.weight > 0 needs a training "
                "file built with `chatretriever build-train ... --teacher NAME`"
            )
        pos = ex.teacher.positives[positive_index(ex.id, len(ex.positives), seed, epoch)]
        scores = [pos, *ex.teacher.negatives[:n_negatives]]
        out[i, : len(scores)] = torch.tensor(scores)
    return out


def contrastive_batch(
    template: Any,
    examples: Sequence[TrainingExample],
    sessions: Sequence[Sequence[dict[str, str]]],
    loss: LossConfig,
    pad_id: int,
    padding_side: str = "right",
    seed: int = 0,
    epoch: int = 0,
) -> tuple[dict[str, Any], list[TrainingPassage]]:
    """The session side and the passage side of one contrastive step.

    Args:
        template: The model's `RetrievalTemplate`.
        examples: The step's examples.
        sessions: The session side of each example as chat messages.
        loss: Under the LM part (`loss.uses_lm`) the session side is a CSIT batch ([session,
            EMB, target] under `loss.session_mask`), else a plain session batch.
        pad_id, padding_side: Padding of the plain batches.
        seed, epoch: Choose each example's positive (`positive_index`).

    Returns:
        ({"sessions", "passages", "layout"}, the encoded passages in layout row order).
    """
    if loss.uses_lm:
        pieces = template.csit_pieces_batch(sessions, [ex.target_text for ex in examples])
        session_batch = csit_batch(pieces, pad_id, loss.session_mask)
    else:
        session_batch = encode_batch(template.session_ids_batch(sessions), pad_id, padding_side)
    passages, layout = candidate_layout(examples, loss.n_hard_negatives, seed, epoch)
    passage_batch = encode_batch(template.passage_ids_batch(passages), pad_id, padding_side)
    return {"sessions": session_batch, "passages": passage_batch, "layout": layout}, passages


def layout_contrastive_part(
    session_emb: torch.Tensor,
    passage_emb: torch.Tensor,
    layout: CandidateLayout,
    loss: LossConfig,
) -> torch.Tensor:
    """InfoNCE of a `contrastive_batch` step (hard negatives, in-batch negatives as `loss` says);
    under DDP the candidates of every process are gathered, with gradients.

    Args:
        session_emb: (B, D) session embeddings.
        passage_emb: (R, D) the encoded passages of the layout.
        layout: The step's `CandidateLayout`.
        loss: Temperature and in-batch setting.

    Returns:
        The scalar loss.
    """
    from chatretriever.modeling.distributed import gather, rank_and_world

    rank, world = rank_and_world()
    return layout_contrastive_loss(
        session_emb,
        passage_emb,
        layout,
        temperature=loss.temperature,
        in_batch=loss.in_batch,
        gather=gather if world > 1 else None,
        rank=rank,
    )["contrastive"]
