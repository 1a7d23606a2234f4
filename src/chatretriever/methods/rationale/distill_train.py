"""Training the Rabtriever predictor on precomputed features (`distill.DistillFeatures`).

A training item is one QUERY with all its candidates (the pairs of one session): the pointwise
parts (`mse`, `reverse_kl`) read every candidate, the optional `rank` part compares a query's
candidates with each other. `per_device_train_batch_size` therefore counts queries.

With validation queries (`train_predictor(..., validation=...)`), every `eval_steps` steps and
at the end the predictor is scored on them: `val_agreement`, the fraction of validation queries
whose top candidate is the teacher's (ties shared), and `val_rank` (the `rank` loss). The state
with the best agreement (the earliest of equals) is the one kept and saved: early stopping on
held-out training queries, never on evaluation data.
"""

from __future__ import annotations

import copy
import hashlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from chatretriever.methods.rationale.distill import (
    DistillFeatures,
    Predictor,
    PredictorConfig,
    RabtrieverEncoder,
    distill_losses,
    option_margin,
    rank_loss,
    save_predictor,
)
from chatretriever.methods.rationale.pairs import ChoicePair
from chatretriever.types import Session

logger = logging.getLogger(__name__)

# The predictor's training defaults (under a recipe's `training:`): a small MLP on fixed features
# learns fast at a large step, and a run takes minutes, so no checkpoints; one process, so the
# last short batch is kept (a few queries still train). The batch counts queries.
PREDICTOR_TRAINING: dict[str, Any] = {
    "learning_rate": 1e-3,
    "num_train_epochs": 3,
    "max_steps": -1,
    "per_device_train_batch_size": 64,
    "warmup_steps": 0,
    "logging_steps": 10,
    "save_strategy": "no",
    "dataloader_drop_last": False,
}


class QueryGroups(torch.utils.data.Dataset):
    """One item per query: its state and its candidates' rows of `DistillFeatures`.

    Args:
        features: (N, ...) rows of aligned pairs.
        groups: Each query's row indices (its pairs; they share the query state).
    """

    def __init__(self, features: DistillFeatures, groups: Sequence[Sequence[int]]) -> None:
        if not groups or any(not g for g in groups):
            raise ValueError("every query group needs at least one pair")
        self.f = features
        self.groups = [list(g) for g in groups]

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        g = self.groups[i]
        return {
            "query": self.f.query[g[0]],  # (H,)
            "document": self.f.document[g],  # (G, H)
            "teacher": self.f.teacher[g],  # (G, H)
            "teacher_logits": self.f.teacher_logits[g],  # (G, 2)
        }


def pad_rows(rows: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Row blocks of different lengths, zero-padded to the longest: (B, G, ...) and the (B, G)
    mask of the real rows."""
    size = max(r.shape[0] for r in rows)
    out = rows[0].new_zeros(len(rows), size, *rows[0].shape[1:])  # (B, G, ...)
    mask = torch.zeros(len(rows), size, dtype=torch.bool)  # (B, G)
    for i, r in enumerate(rows):
        out[i, : r.shape[0]], mask[i, : r.shape[0]] = r, True
    return out, mask


def collate_groups(items: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Queries padded to the largest group: (B, H) query, (B, G, ...) rows, (B, G) mask."""
    batch: dict[str, torch.Tensor] = {"query": torch.stack([item["query"] for item in items])}
    for key in ("document", "teacher", "teacher_logits"):
        batch[key], batch["mask"] = pad_rows([item[key] for item in items])
    return batch


def distill_loss_fn(encoder: RabtrieverEncoder, kl_weight: float, rank_weight: float = 0.0) -> Any:
    """The `NamedLossFn` of the predictor over a batch of query groups: {mse, reverse_kl}
    over every candidate, plus {rank} (weighted) when `rank_weight` > 0."""

    def loss_fn(predictor: Any, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        mask = inputs["mask"]  # (B, G)
        queries = inputs["query"][:, None].expand_as(inputs["document"])  # (B, G, H)
        predicted = predictor(queries[mask], inputs["document"][mask])  # (N, H)
        student = encoder.lm_head_options(predicted)  # (N, 2)
        teacher_logits = inputs["teacher_logits"][mask]  # (N, 2)
        parts = distill_losses(predicted, inputs["teacher"][mask], student, teacher_logits,
                               kl_weight)  # fmt: skip
        if rank_weight > 0:
            s = torch.zeros(mask.shape, device=student.device)  # (B, G)
            t = torch.zeros(mask.shape, device=student.device)  # (B, G)
            s[mask], t[mask] = option_margin(student), option_margin(teacher_logits)
            parts["rank"] = rank_weight * rank_loss(s, t, mask)
        return parts

    return loss_fn


def top1_agreement(
    student: torch.Tensor, teacher: torch.Tensor, groups: Sequence[Sequence[int]]
) -> float:
    """Fraction of groups whose top row by `student` is the teacher's top row (each score
    tied at the top gets an equal share: a constant student scores 1 / group size)."""
    total = 0.0
    for g in groups:
        s, t = student[list(g)], teacher[list(g)]  # (G,)
        best = s == s.max()
        total += float((best & (t == t.max())).sum()) / float(best.sum())
    return total / len(groups)


def query_groups(pairs: Sequence[ChoicePair]) -> list[list[int]]:
    """Each query's pair indices (pairs of one session id), in first-seen order."""
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(pairs):
        groups.setdefault(p.session.id, []).append(i)
    return list(groups.values())


def _dialog(session: Session) -> str:
    return str(session.metadata.get("dialog", session.id))


def split_groups(
    pairs: Sequence[ChoicePair], groups: Sequence[list[int]], fraction: float
) -> tuple[list[list[int]], list[list[int]]]:
    """(train, validation) query groups: whole dialogs go to validation when the sha1 of their
    key falls in the first `fraction` of the hash range (deterministic, order-free; turns of
    one dialog share their history, so they stay on one side).

    Raises:
        ValueError: `fraction` > 0 leaves either side empty (too few dialogs).
    """
    if fraction <= 0:
        return list(groups), []

    def held_out(g: list[int]) -> bool:
        digest = hashlib.sha1(_dialog(pairs[g[0]].session).encode()).digest()
        return int.from_bytes(digest[:8], "big") < fraction * 2**64

    train: list[list[int]] = []
    val: list[list[int]] = []
    for g in groups:
        (val if held_out(g) else train).append(g)
    if not train or not val:
        dialogs = len({_dialog(pairs[g[0]].session) for g in groups})
        raise ValueError(f"validation {fraction} of {dialogs} dialog(s) leaves a side empty")
    return train, val


def subset(features: DistillFeatures, groups: Sequence[list[int]]) -> DistillFeatures:
    """The rows of `groups` as their own features (the groups' indices: `renumber`)."""
    rows = [i for g in groups for i in g]
    return DistillFeatures(**{k: v[rows] for k, v in asdict(features).items()})


def renumber(groups: Sequence[list[int]]) -> list[list[int]]:
    """Groups over the rows `subset` keeps, in its order."""
    out, start = [], 0
    for g in groups:
        out.append(list(range(start, start + len(g))))
        start += len(g)
    return out


@dataclass
class Validation:
    """Held-out training queries for early stopping.

    Attributes:
        features: Their rows. groups: Each query's row indices. every: Steps between checks.
    """

    features: DistillFeatures
    groups: list[list[int]]
    every: int = 20

    def __post_init__(self) -> None:
        if not self.groups:
            raise ValueError("validation needs at least one query")
        if self.every < 1:
            raise ValueError(f"eval_steps must be >= 1, got {self.every}")


class _KeepBest(TrainerCallback):
    """Scores the predictor on the validation queries, logs it, keeps the best state and puts
    it back when training ends."""

    def __init__(self, predictor: Predictor, encoder: RabtrieverEncoder, val: Validation) -> None:
        self.predictor, self.encoder, self.val = predictor, encoder, val
        self.best: tuple[float, int, dict[str, torch.Tensor]] | None = None
        self.teacher = option_margin(val.features.teacher_logits)  # (N,)

    @torch.no_grad()
    def _check(self, state: Any) -> None:
        f = self.val.features
        was_training = self.predictor.training
        self.predictor.eval()
        device = next(self.predictor.parameters()).device
        predicted = self.predictor(f.query.to(device), f.document.to(device))  # (N, H)
        student = option_margin(self.encoder.lm_head_options(predicted)).cpu()  # (N,)
        self.predictor.train(was_training)
        agreement = top1_agreement(student, self.teacher, self.val.groups)
        s, mask = pad_rows([student[list(g)] for g in self.val.groups])  # (Q, G)
        t, _ = pad_rows([self.teacher[list(g)] for g in self.val.groups])  # (Q, G)
        row = {"step": state.global_step, "val_agreement": round(agreement, 6),
               "val_rank": round(float(rank_loss(s, t, mask)), 6)}  # fmt: skip
        state.log_history.append(row)
        logger.info("validation %s", row)
        if self.best is None or agreement > self.best[0]:
            weights = copy.deepcopy(self.predictor.state_dict())
            self.best = (agreement, state.global_step, weights)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step % self.val.every == 0:
            self._check(state)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step % self.val.every != 0:
            self._check(state)
        assert self.best is not None
        agreement, step, weights = self.best
        self.predictor.load_state_dict(weights)
        state.log_history.append({"step": state.global_step, "best_step": step,
                                  "best_val_agreement": round(agreement, 6)})  # fmt: skip
        logger.info("kept the predictor of step %d (validation agreement %.4f)", step, agreement)


def predictor_arguments(output_dir: str | Path, training: Mapping[str, Any] | None) -> Any:
    """The predictor's TrainingArguments: `PREDICTOR_TRAINING` under the recipe's `training:`.

    Raises:
        ValueError: Settings TrainingArguments refuses together (e.g. `load_best_model_at_end`
            without an evaluation strategy).
    """
    from chatretriever.modeling.trainer import training_arguments

    return training_arguments(output_dir, {**PREDICTOR_TRAINING, **dict(training or {})})


def train_predictor(
    encoder: RabtrieverEncoder,
    features: DistillFeatures,
    output_dir: str | Path,
    config: PredictorConfig | None = None,
    kl_weight: float = 1.0,
    training: Mapping[str, Any] | None = None,
    groups: Sequence[Sequence[int]] | None = None,
    rank_weight: float = 0.0,
    validation: Validation | None = None,
) -> Predictor:
    """Train the predictor on precomputed features with the shared `NamedLossTrainer`; the
    predictor (`save_predictor`: the best on `validation` when given, else the last) and the
    log (`train_log.jsonl`, validation rows included) go to `output_dir`.

    Args:
        groups: Each query's rows in `features` (default: every row its own query).
        rank_weight: Weight of the `rank` part (0: off; it needs groups of two or more).
    """
    from transformers import set_seed

    from chatretriever.modeling.recipe import LOG_FILE, write_log
    from chatretriever.modeling.trainer import NamedLossTrainer

    args = predictor_arguments(output_dir, training)
    set_seed(args.seed)  # the predictor's initialisation comes before the Trainer seeds anything
    predictor = Predictor(config or PredictorConfig(hidden=features.query.shape[1]))
    groups = groups if groups is not None else [[i] for i in range(features.query.shape[0])]
    trainer = NamedLossTrainer(
        model=predictor,
        args=args,
        train_dataset=QueryGroups(features, groups),
        data_collator=collate_groups,
        loss_fn=distill_loss_fn(encoder, kl_weight, rank_weight),
    )
    if validation is not None:
        trainer.add_callback(_KeepBest(predictor, encoder, validation))
    trainer.train()
    save_predictor(predictor, output_dir)
    write_log(Path(output_dir) / LOG_FILE, trainer.state.log_history)
    return predictor
