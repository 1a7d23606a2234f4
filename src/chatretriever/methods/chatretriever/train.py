"""CSIT training: a transformers `Trainer` that sums the named loss parts and logs each one.

One step: the collator turns TrainingExamples into a CSIT batch ([session, EMB, response, EMB]
under the session mask, or a plain session batch when the LM part is off) plus one passage
batch (each example's positive, then its hard negatives); one forward pass of the session side
gives both the session embedding and the LM logits; the passage side is a second forward.
Under DDP (torchrun / accelerate launch) the positives and negatives of every process are
gathered (with gradients) so that in-batch negatives span the global batch.

Checkpoints hold only what trains (the LoRA adapter and the EMB rows, or the full model under
full fine-tuning) plus the Trainer's optimizer, scheduler and RNG state, so `resume` continues
exactly where a killed run stopped.
"""

from __future__ import annotations

import logging
import zlib
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainingArguments

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
from chatretriever.types import Turn

logger = logging.getLogger(__name__)

QUERY_MODES = ("session", "last_turn")


def passage_key(p: TrainingPassage) -> int:
    """A process-independent int64 key of a passage's text (Python's hash() is salted)."""
    return zlib.crc32(passage_text(p).strip().encode("utf-8"))


def last_turn_only(messages: Sequence[Turn]) -> tuple[Turn, ...]:
    """The session reduced to its last user question (the contrastive-only last-turn ablation)."""
    return (messages[-1],)


class TrainingSet(torch.utils.data.Dataset):
    """Training examples, each listed `repeat` times (to up-weight a small source)."""

    def __init__(self, parts: Sequence[tuple[Sequence[TrainingExample], int]]) -> None:
        self.examples: list[TrainingExample] = []
        for examples, repeat in parts:
            if repeat < 1:
                raise ValueError(f"repeat must be >= 1, got {repeat}")
            self.examples.extend(list(examples) * repeat)
        if not self.examples:
            raise ValueError("no training examples")

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> TrainingExample:
        return self.examples[i]


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


def _gather(t: torch.Tensor) -> torch.Tensor:
    """Concatenate a tensor over all processes, keeping gradients for the local part."""
    import torch.distributed as dist
    from torch.distributed.nn.functional import all_gather

    if t.requires_grad:
        return torch.cat(all_gather(t))
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def _world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


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
    rank, world = _world()
    offset = 0
    if loss.in_batch and world > 1:
        pos, neg = _gather(pos), _gather(neg)
        pos_keys, neg_keys, neg_valid = _gather(pos_keys), _gather(neg_keys), _gather(neg_valid)
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


class CsitTrainer(Trainer):
    """A Trainer whose loss is the sum of the CSIT parts; each part is logged on its own.

    Checkpoints save only the trainable state (`ChatRetriever.save_pretrained`) and reload it
    on resume.
    """

    def __init__(self, *args: Any, loss_config: LossConfig, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.loss_config = loss_config
        self._part_sums: dict[str, float] = defaultdict(float)
        self._part_count = 0

    def compute_loss(
        self,
        model: Any,
        inputs: Mapping[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        outputs = model(sessions=inputs["sessions"], passages=inputs["passages"])
        parts = csit_losses(outputs, inputs, self.loss_config)
        total = sum(parts.values())
        if model.training:
            for name, value in parts.items():
                self._part_sums[name] += float(value.detach())
            self._part_count += 1
        return (total, outputs) if return_outputs else total

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if self._part_count and "loss" in logs:
            for name, value in self._part_sums.items():
                logs[f"loss_{name}"] = round(value / self._part_count, 6)
            self._part_sums.clear()
            self._part_count = 0
        super().log(logs, *args, **kwargs)

    def _save(self, output_dir: str | None = None, state_dict: Any = None) -> None:
        out = Path(output_dir or self.args.output_dir)
        self.accelerator.unwrap_model(self.model).save_pretrained(out)
        torch.save(self.args, out / "training_args.bin")

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        target = self.accelerator.unwrap_model(model or self.model)
        target.load_trainable_state(resume_from_checkpoint)
        logger.info("resumed trainable weights from %s", resume_from_checkpoint)


def training_arguments(output_dir: str | Path, settings: Mapping[str, Any]) -> TrainingArguments:
    """TrainingArguments with this project's defaults under the user's `training:` settings."""
    defaults: dict[str, Any] = {
        "max_steps": 200,
        "per_device_train_batch_size": 8,
        "learning_rate": 1e-4,
        "lr_scheduler_type": "linear",
        "warmup_steps": 10,
        "weight_decay": 0.0,
        "logging_steps": 10,
        "save_strategy": "steps",
        "save_steps": 50,
        "save_total_limit": 2,
        "seed": 42,
        "report_to": [],
        "dataloader_drop_last": True,  # equal batch shapes on every process (gathering)
        "remove_unused_columns": False,
        "ddp_find_unused_parameters": False,
    }
    merged = {**defaults, **dict(settings), "output_dir": str(output_dir)}
    if merged.get("bf16") or merged.get("fp16"):
        raise ValueError(
            "training.bf16/fp16: precision is set by retriever.dtype (bf16 autocast by default)"
        )
    return TrainingArguments(**merged)


@dataclass
class TrainResult:
    """What `train` produced."""

    output_dir: Path
    steps: int
    log_history: list[dict[str, Any]] = field(default_factory=list)


def steps_per_epoch(n_examples: int, batch_size: int, world: int, accumulation: int) -> int:
    """Optimizer steps in one epoch with drop_last batches."""
    return max(1, (n_examples // (batch_size * world)) // accumulation)


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
