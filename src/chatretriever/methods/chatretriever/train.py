"""CSIT training: the collator, the named loss parts, and CSIT's use of the shared trainer.

One step: the collator turns TrainingExamples into a CSIT batch ([session, EMB, response, EMB]
under the session mask, or a plain session batch when the LM part is off) plus one passage
batch (each example's positive, then its hard negatives); one forward pass of the session side
gives both the session embedding and the LM logits; the passage side is a second forward.
Under DDP (torchrun / accelerate launch) the positives and negatives of every process are
gathered (with gradients) so that in-batch negatives span the global batch.

`CsitTrainer` is `modeling.trainer.NamedLossTrainer` with `CsitLoss` as its loss: it sums and
logs the parts, and its checkpoints hold only what trains (the LoRA adapter and the EMB rows, or
the full model under full fine-tuning) plus the optimizer, scheduler and RNG state, so `resume`
continues exactly where a killed run stopped.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from chatretriever.config import LossConfig
from chatretriever.methods.chatretriever.data import TrainingExample, TrainingPassage
from chatretriever.modeling.collate import csit_batch, encode_batch
from chatretriever.modeling.losses import (
    candidate_exclusions,
    combine_csit_losses,
    contrastive_loss,
    session_masked_lm_loss,
)
from chatretriever.modeling.template import RetrievalTemplate, passage_text
from chatretriever.modeling.trainer import NamedLossTrainer, gather, rank_and_world
from chatretriever.types import Turn

QUERY_MODES = ("session", "last_turn")


def passage_key(p: TrainingPassage) -> int:
    """A process-independent int64 key of a passage's text (Python's hash() is salted)."""
    return zlib.crc32(passage_text(p).strip().encode("utf-8"))


def last_turn_only(messages: Sequence[Turn]) -> tuple[Turn, ...]:
    """The session reduced to its last user question (the contrastive-only last-turn ablation)."""
    return (messages[-1],)


@dataclass
class CsitCollator:
    """TrainingExamples -> {"sessions", "passages", keys} tensors for `CsitTrainer`.

    Positives: each example's first positive. Negatives: its first `n_hard_negatives` (the
    builders already sampled them from a rank window); missing ones are padded and masked, so
    every process sees the same shapes (needed to gather across processes).
    """

    template: RetrievalTemplate
    loss: LossConfig
    pad_id: int
    padding_side: str = "right"
    mask_dtype: torch.dtype = torch.float32
    query: str = "session"

    def __post_init__(self) -> None:
        if self.query not in QUERY_MODES:
            raise ValueError(f"query must be one of {QUERY_MODES}, got {self.query!r}")

    def __call__(self, examples: Sequence[TrainingExample]) -> dict[str, Any]:
        k = self.loss.n_hard_negatives
        sessions = [self._messages(ex) for ex in examples]
        if self.loss.uses_lm:
            pieces = [
                self.template.csit_pieces(s, ex.target_text)
                for s, ex in zip(sessions, examples, strict=True)
            ]
            session_batch = csit_batch(pieces, self.pad_id, self.loss.session_mask, self.mask_dtype)
        else:
            ids = [self.template.session_ids(s) for s in sessions]
            session_batch = encode_batch(ids, self.pad_id, self.padding_side)
        texts = [ex.positives[0] for ex in examples]
        neg_keys = torch.full((len(examples), k), -1, dtype=torch.long)  # (B, K)
        neg_valid = torch.zeros((len(examples), k), dtype=torch.bool)
        for b, ex in enumerate(examples):
            for j in range(k):
                have = j < len(ex.negatives)
                p = ex.negatives[j] if have else ex.positives[0]  # padding slot: masked below
                texts.append(p)
                neg_keys[b, j] = passage_key(p) if have else -1
                neg_valid[b, j] = have
        # Padding slots re-encode the positive; cheap enough and keeps shapes fixed.
        passage_ids = [self.template.passage_ids(p) for p in texts]
        return {
            "sessions": session_batch,
            "passages": encode_batch(passage_ids, self.pad_id, self.padding_side),
            "pos_keys": torch.tensor([passage_key(ex.positives[0]) for ex in examples]),
            "neg_keys": neg_keys,
            "neg_valid": neg_valid,
        }

    def _messages(self, ex: TrainingExample) -> list[dict[str, str]]:
        turns = last_turn_only(ex.messages) if self.query == "last_turn" else ex.messages
        return [t.to_dict() for t in turns]


def csit_losses(
    outputs: Mapping[str, torch.Tensor], inputs: Mapping[str, Any], loss: LossConfig
) -> dict[str, torch.Tensor]:
    """The named, weighted loss parts of one step (their sum is the training loss).

    Args:
        outputs: `ChatRetriever.forward` output: "session_emb" (B, D), "passage_emb"
            (B + B*K, D) = positives then each example's K negatives, and under the LM part
            "lm_logits" (N, V), "lm_labels" (N,).
        inputs: The collator's batch (keys and validity of the negatives).
        loss: The loss settings.

    Returns:
        {"contrastive": L_C} (+ {"session_lm": alpha * L_S}).
    """
    q = outputs["session_emb"]  # (B, D)
    b, k = q.shape[0], loss.n_hard_negatives
    emb = outputs["passage_emb"]
    pos, neg = emb[:b], emb[b:].reshape(b, k, -1)  # (B, D), (B, K, D)
    pos_keys, neg_keys, neg_valid = inputs["pos_keys"], inputs["neg_keys"], inputs["neg_valid"]
    rank, world = rank_and_world()
    offset = 0
    if loss.in_batch and world > 1:
        pos, neg = gather(pos), gather(neg)
        pos_keys, neg_keys, neg_valid = gather(pos_keys), gather(neg_keys), gather(neg_valid)
        offset = rank * b
    exclude = candidate_exclusions(pos_keys, neg_keys, neg_valid, b, offset, loss.in_batch)
    parts = contrastive_loss(
        q,
        pos,
        neg if k else None,
        temperature=loss.temperature,
        in_batch=loss.in_batch,
        offset=offset,
        exclude=exclude,
    )
    lm = None
    if loss.uses_lm:
        lm = session_masked_lm_loss(
            outputs["lm_logits"], outputs["lm_labels"], loss.label_smoothing
        )
    return combine_csit_losses(parts, lm, loss.alpha)


@dataclass
class CsitLoss:
    """CSIT's `NamedLossFn`: one forward of both sides, then `csit_losses`."""

    loss: LossConfig

    def __call__(self, model: Any, inputs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        outputs = model(sessions=inputs["sessions"], passages=inputs["passages"])
        return csit_losses(outputs, inputs, self.loss)


class CsitTrainer(NamedLossTrainer):
    """The shared `NamedLossTrainer` with the CSIT loss (L_C + alpha * L_S, parts logged)."""

    def __init__(self, *args: Any, loss_config: LossConfig, **kwargs: Any) -> None:
        super().__init__(*args, loss_fn=CsitLoss(loss_config), **kwargs)
        self.loss_config = loss_config


def make_collator(retriever: Any, loss: LossConfig, query: str) -> CsitCollator:
    """The collator matching a ChatRetriever's template, padding and compute dtype."""
    return CsitCollator(
        template=retriever.template,
        loss=loss,
        pad_id=retriever.pad_id,
        padding_side=retriever.padding_side,
        mask_dtype=torch.float32,
        query=query,
    )
