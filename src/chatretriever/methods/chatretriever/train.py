"""CSIT training: the collator, the named loss parts, and CSIT's use of the shared trainer.

One step: the collator turns TrainingExamples into a CSIT batch ([session, EMB, response] under
the session mask, or a plain session batch when the LM part is off) plus one passage batch (each
example's positive for this epoch and its real hard negatives) and their `CandidateLayout`; one
forward pass of the session side gives both the session embedding and the LM logits; the passage
side is a second forward. No passage relevant to a session (any of its positives, by id or by
normalised text) is ever scored as its negative. Under DDP (torchrun / accelerate launch) the
candidates of every process are gathered (with gradients) so that in-batch negatives span the
global batch.

`CsitTrainer` is `modeling.trainer.NamedLossTrainer` with `CsitLoss` as its loss: it sums and
logs the parts, and its checkpoints hold only what trains (the LoRA adapter and the EMB rows, or
the full model under full fine-tuning) plus the optimizer, scheduler and RNG state, so `resume`
continues exactly where a killed run stopped.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from chatretriever.config import LossConfig
from chatretriever.io.training import TrainingExample
from chatretriever.methods.chatretriever.recipe import DistillSettings
from chatretriever.modeling.candidates import (
    contrastive_batch,
    layout_contrastive_part,
    teacher_slot_scores,
)
from chatretriever.modeling.losses import (
    IGNORE_INDEX,
    CandidateLayout,
    combine_csit_losses,
    score_distillation_loss,
    session_masked_lm_loss,
)
from chatretriever.modeling.template import RetrievalTemplate
from chatretriever.modeling.trainer import NamedLossTrainer
from chatretriever.types import Turn

QUERY_MODES = ("session", "last_turn")


def last_turn_only(messages: Sequence[Turn]) -> tuple[Turn, ...]:
    """The session reduced to its last user question (the contrastive-only last-turn ablation)."""
    return (messages[-1],)


@dataclass
class CsitCollator:
    """TrainingExamples -> {"sessions", "passages", "layout"} for `CsitTrainer`.

    "sessions" is a CSIT batch (`collate.csit_batch`) under the LM part, else a plain session
    batch; "passages" encodes each example's positive and real hard negatives; "layout" is their
    `CandidateLayout` (see `candidate_layout`); with `teacher`, "teacher_scores" holds the
    teacher's scores of the same slots (`teacher_slot_scores`). `set_epoch` (called by the
    trainer at the start of every epoch) chooses which positive each example trains with.
    """

    template: RetrievalTemplate
    loss: LossConfig
    pad_id: int
    padding_side: str = "right"
    query: str = "session"
    seed: int = 0
    epoch: int = 0
    teacher: bool = False

    def __post_init__(self) -> None:
        if self.query not in QUERY_MODES:
            raise ValueError(f"query must be one of {QUERY_MODES}, got {self.query!r}")

    def set_epoch(self, epoch: int, seed: int | None = None) -> None:
        """The epoch (and trainer seed) that choose each example's positive."""
        self.epoch = epoch
        if seed is not None:
            self.seed = seed

    def __call__(self, examples: Sequence[TrainingExample]) -> dict[str, Any]:
        sessions = [self.messages(ex) for ex in examples]
        batch, _ = contrastive_batch(
            self.template,
            examples,
            sessions,
            self.loss,
            self.pad_id,
            self.padding_side,
            self.seed,
            self.epoch,
        )
        if self.teacher:
            k = self.loss.n_hard_negatives
            batch["teacher_scores"] = teacher_slot_scores(examples, k, self.seed, self.epoch)
        return batch

    def messages(self, ex: TrainingExample) -> list[dict[str, str]]:
        """The session side of an example as chat messages (the last turn only under
        query="last_turn")."""
        turns = last_turn_only(ex.messages) if self.query == "last_turn" else ex.messages
        return [t.to_dict() for t in turns]


def distill_part(
    outputs: Mapping[str, torch.Tensor],
    inputs: Mapping[str, Any],
    loss: LossConfig,
    distill: DistillSettings,
) -> dict[str, torch.Tensor]:
    """{"distill": weight * KL(teacher || student)} over each example's own candidate slots
    (its positive and hard negatives: the slots the teacher scored; padding left out)."""
    layout: CandidateLayout = inputs["layout"].to(outputs["session_emb"].device)
    slots = layout.place(outputs["passage_emb"])  # (B, 1 + K, D)
    student = torch.einsum("bd,bkd->bk", outputs["session_emb"], slots)  # (B, 1 + K)
    part = score_distillation_loss(
        student,
        inputs["teacher_scores"],
        layout.valid,
        student_temperature=loss.temperature,
        teacher_temperature=distill.temperature,
    )
    return {"distill": distill.weight * part["distill"]}


def csit_losses(
    outputs: Mapping[str, torch.Tensor],
    inputs: Mapping[str, Any],
    loss: LossConfig,
    distill: DistillSettings | None = None,
) -> dict[str, torch.Tensor]:
    """The named, weighted loss parts of one step (their sum is the training loss).

    Args:
        outputs: `ChatRetriever.forward` output: "session_emb" (B, D), "passage_emb" (R, D)
            (the encoded passages of the layout), and under the LM part "lm_logits" (N, V),
            "lm_labels" (N,).
        inputs: The collator's batch ("layout": the `CandidateLayout`).
        loss: The loss settings.
        distill: The teacher distillation part (None or weight 0: off); when on, the batch
            carries "teacher_scores" (B, 1 + K).

    Returns:
        {"contrastive": L_C} (+ {"session_lm": alpha * L_S}) (+ {"distill": w * L_KD}).
    """
    parts = {
        "contrastive": layout_contrastive_part(
            outputs["session_emb"], outputs["passage_emb"], inputs["layout"], loss
        )
    }
    lm = None
    if loss.uses_lm:
        lm = session_masked_lm_loss(
            outputs["lm_logits"], outputs["lm_labels"], loss.label_smoothing
        )
    parts = combine_csit_losses(parts, lm, loss.alpha)
    if distill is not None and distill.weight > 0:
        parts.update(distill_part(outputs, inputs, loss, distill))
    return parts


@dataclass
class CsitLoss:
    """CSIT's `NamedLossFn`: one forward of both sides, then `csit_losses`."""

    loss: LossConfig
    distill: DistillSettings | None = None

    def __call__(self, model: Any, inputs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        outputs = model(sessions=inputs["sessions"], passages=inputs["passages"])
        return csit_losses(outputs, inputs, self.loss, self.distill)

    def token_counts(self, inputs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """{"session_lm": the response tokens the LM part averages over} (the trainer makes
        it a token mean over a whole accumulated step); {} without the LM part."""
        labels = inputs["sessions"].get("labels") if self.loss.uses_lm else None
        if labels is None:
            return {}
        return {"session_lm": (labels[:, 1:] != IGNORE_INDEX).sum()}  # the targets predicted


class CsitTrainer(NamedLossTrainer):
    """The shared `NamedLossTrainer` with the CSIT loss (L_C + alpha * L_S [+ distillation],
    parts logged)."""

    def __init__(
        self,
        *args: Any,
        loss_config: LossConfig,
        distill: DistillSettings | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, loss_fn=CsitLoss(loss_config, distill), **kwargs)
        self.loss_config = loss_config


def make_collator(
    retriever: Any, loss: LossConfig, query: str, distill: DistillSettings | None = None
) -> CsitCollator:
    """The collator matching a ChatRetriever's template and padding."""
    return CsitCollator(
        template=retriever.template,
        loss=loss,
        pad_id=retriever.pad_id,
        padding_side=retriever.padding_side,
        query=query,
        teacher=distill is not None and distill.weight > 0,
    )
