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

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from chatretriever.config import LossConfig
from chatretriever.methods.chatretriever.data import (
    TrainingExample,
    TrainingPassage,
    passage_keys,
)
from chatretriever.methods.chatretriever.recipe import DistillSettings
from chatretriever.modeling.collate import csit_batch, encode_batch
from chatretriever.modeling.losses import (
    N_KEYS,
    CandidateLayout,
    combine_csit_losses,
    layout_contrastive_loss,
    score_distillation_loss,
    session_masked_lm_loss,
)
from chatretriever.modeling.template import RetrievalTemplate
from chatretriever.modeling.trainer import NamedLossTrainer, gather, rank_and_world
from chatretriever.types import Turn

QUERY_MODES = ("session", "last_turn")


def last_turn_only(messages: Sequence[Turn]) -> tuple[Turn, ...]:
    """The session reduced to its last user question (the contrastive-only last-turn ablation)."""
    return (messages[-1],)


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
        if self.loss.uses_lm:
            targets = [ex.target_text for ex in examples]
            pieces = self.template.csit_pieces_batch(sessions, targets)  # few tokenizer calls
            session_batch = csit_batch(pieces, self.pad_id, self.loss.session_mask)
        else:
            ids = self.template.session_ids_batch(sessions)
            session_batch = encode_batch(ids, self.pad_id, self.padding_side)
        passages, layout = candidate_layout(
            examples, self.loss.n_hard_negatives, self.seed, self.epoch
        )
        passage_ids = self.template.passage_ids_batch(passages)
        batch = {
            "sessions": session_batch,
            "passages": encode_batch(passage_ids, self.pad_id, self.padding_side),
            "layout": layout,
        }
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
    rank, world = rank_and_world()
    parts = layout_contrastive_loss(
        outputs["session_emb"],
        outputs["passage_emb"],
        inputs["layout"],
        temperature=loss.temperature,
        in_batch=loss.in_batch,
        gather=gather if world > 1 else None,
        rank=rank,
    )
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
