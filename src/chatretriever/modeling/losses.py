"""The CSIT losses: InfoNCE (L_C), the session-masked LM loss (L_S), L = L_C + alpha * L_S, and an
optional teacher score distillation (KL to an off-the-shelf embedder's distribution).

Losses take embeddings or logits, never the model, and return dicts of named parts; the trainer
sums the parts and logs each one. The contrastive candidates of a batch (which encoded passages
are each example's positive and hard negatives, and which passages are relevant to each session
and so never its negatives) are one `CandidateLayout`, built by the collator.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
"""The label of a position that carries no LM loss (the one definition; Hugging Face's value)."""


def contrastive_loss(
    q: torch.Tensor,
    pos: torch.Tensor,
    neg: torch.Tensor | None = None,
    temperature: float = 0.01,
    in_batch: bool = True,
    offset: int = 0,
    exclude: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """InfoNCE between each session and its positive against hard and in-batch negatives.

    Scores are dot products divided by `temperature` (pass L2-normalised embeddings for
    cosine similarity).

    Args:
        q: (B, D) session embeddings.
        pos: (N, D) positives. Without in-batch negatives N == B; with them N >= B may hold
            the positives of every process (row `offset + i` is session i's positive).
        neg: (N, K, D) hard negatives of each row of `pos`, or None.
        temperature: Softmax temperature.
        in_batch: Also score every other example's positive and hard negatives as negatives.
        offset: Row of `pos` holding the positive of q[0] (the process rank times B under DDP).
        exclude: (B, C) bool, True = candidate left out of row i's softmax (padding, or a
            passage relevant to session i); C = N + N*K candidates in the order [pos, neg
            flattened] with in-batch negatives, else 1 + K ([own positive, own negatives]).
            See `candidate_exclusions`.

    Returns:
        {"contrastive": scalar loss}.
    """
    b = q.shape[0]
    if q.dim() != 2 or pos.dim() != 2 or pos.shape[1] != q.shape[1]:
        raise ValueError(f"q and pos must both be (*, D), got {tuple(q.shape)}, {tuple(pos.shape)}")
    if neg is not None and (neg.dim() != 3 or neg.shape[0] != pos.shape[0]):
        raise ValueError(f"neg must be (N, K, D) with N = len(pos), got {tuple(neg.shape)}")
    if not 0 <= offset <= pos.shape[0] - b or (not in_batch and pos.shape[0] != b):
        raise ValueError(f"{b} sessions at offset {offset} do not fit {pos.shape[0]} positives")
    if in_batch:
        cands = pos if neg is None else torch.cat([pos, neg.reshape(-1, neg.shape[-1])])
        scores = q @ cands.T  # (B, N + N*K): column offset + i is session i's positive
        target = torch.arange(b, device=q.device) + offset
    else:
        if neg is None or neg.shape[1] == 0:
            raise ValueError("in_batch=False needs hard negatives")
        cands = torch.cat([pos.unsqueeze(1), neg], dim=1)  # (B, 1 + K, D)
        scores = torch.einsum("bd,bkd->bk", q, cands)  # (B, 1 + K): column 0 is the positive
        target = torch.zeros(b, dtype=torch.long, device=q.device)
    scores = scores.float() / temperature
    if exclude is not None:
        if exclude.shape != scores.shape:
            raise ValueError(f"exclude must be {tuple(scores.shape)}, got {tuple(exclude.shape)}")
        scores = scores.masked_fill(exclude.to(scores.device), torch.finfo(scores.dtype).min)
    return {"contrastive": F.cross_entropy(scores, target)}


N_KEYS = 2
"""Identity keys per passage in a `CandidateLayout`: an id key and a normalised-text key."""


@dataclass(frozen=True)
class CandidateLayout:
    """Which passage rows are each example's positive and hard negatives, and which passages
    are relevant to it: the one object the collator builds and the contrastive loss reads.

    Example i has 1 + K candidate slots: slot 0 is the positive trained this epoch, slots 1..K
    its hard negatives. Only real passages are encoded; `rows` says where each slot's passage
    sits in that passage batch (a padding slot, when the example has fewer than K negatives,
    has none). A candidate whose key equals a key of ANY of the session's positives (the same
    passage id, or the same normalised text: a near-duplicate) is relevant, so it is never
    scored as a negative of that session.

    Attributes:
        rows: (B, 1 + K) long, the slot's row in the encoded passage batch; -1 = padding slot.
        keys: (B, 1 + K, N_KEYS) int64 identity keys of each slot's passage; -1 = none.
        positive_keys: (B, P, N_KEYS) int64 keys of all of each example's positives (P = the
            most positives of one example in the batch); -1 = none.
    """

    rows: torch.Tensor
    keys: torch.Tensor
    positive_keys: torch.Tensor

    def __post_init__(self) -> None:
        b, slots = self.rows.shape
        if slots < 1 or self.keys.shape != (b, slots, N_KEYS):
            raise ValueError(f"keys must be {(b, slots, N_KEYS)}, got {tuple(self.keys.shape)}")
        if self.positive_keys.dim() != 3 or self.positive_keys.shape[::2] != (b, N_KEYS):
            raise ValueError(f"positive_keys must be (B, P, {N_KEYS}) with B = {b}")
        # Checked on the CPU only (where the collator builds it): on an accelerator it would
        # cost a device sync each time the layout moves.
        if self.rows.device.type == "cpu" and bool((self.rows[:, 0] < 0).any()):
            raise ValueError("every example needs its positive (slot 0 is never padding)")

    @property
    def n_negatives(self) -> int:
        """K, the hard-negative slots of each example."""
        return self.rows.shape[1] - 1

    @property
    def valid(self) -> torch.Tensor:
        """(B, 1 + K) bool, False = padding slot."""
        return self.rows >= 0

    def to(self, device: torch.device | str, non_blocking: bool = False) -> CandidateLayout:
        """The same layout on `device`."""
        rows, keys, pos = (
            t.to(device, non_blocking=non_blocking)
            for t in (self.rows, self.keys, self.positive_keys)
        )
        return CandidateLayout(rows, keys, pos)

    def place(self, passage_emb: torch.Tensor) -> torch.Tensor:
        """Encoded passages into their slots.

        Args:
            passage_emb: (R, D) embeddings of the encoded passage batch (R real passages).

        Returns:
            (B, 1 + K, D); padding slots hold zeros (and are excluded from every softmax).
        """
        padded = torch.cat([passage_emb, passage_emb.new_zeros(1, passage_emb.shape[-1])])
        rows = self.rows.to(passage_emb.device)
        return padded[torch.where(rows >= 0, rows, passage_emb.shape[0])]  # (B, 1 + K, D)


def candidate_exclusions(
    positive_keys: torch.Tensor,
    cand_keys: torch.Tensor,
    cand_valid: torch.Tensor,
    offset: int = 0,
    in_batch: bool = True,
) -> torch.Tensor:
    """Which candidates `contrastive_loss` must leave out: padding, and relevant passages.

    Args:
        positive_keys: (B, P, N_KEYS) keys of every positive of the B sessions scored here.
        cand_keys: (N, 1 + K, N_KEYS) keys of the slots of every row (positive, then hard
            negatives); rows offset .. offset + B - 1 are the sessions' own (N > B: gathered
            from every process).
        cand_valid: (N, 1 + K) bool, False = padding slot.
        offset: Row of the first session.
        in_batch: The candidate layout of `contrastive_loss`: [all N positives, all N * K
            negatives row by row] (C = N + N * K), else each session's own 1 + K slots.

    Returns:
        (B, C) bool, True = leave out; never True at a session's own positive. A candidate is
        left out when it is padding or shares a key (-1 = none) with any of the session's
        positives.
    """
    b = positive_keys.shape[0]
    rows = torch.arange(b, device=cand_keys.device) + offset
    if in_batch:
        keys = torch.cat([cand_keys[:, 0], cand_keys[:, 1:].reshape(-1, N_KEYS)])  # (C, N_KEYS)
        valid = torch.cat([cand_valid[:, 0], cand_valid[:, 1:].reshape(-1)])  # (C,)
        keys, valid, own = keys.unsqueeze(0), valid.unsqueeze(0), rows  # (1, C, N_KEYS)
    else:
        keys, valid, own = cand_keys[rows], cand_valid[rows], torch.zeros_like(rows)
    pk = positive_keys.to(keys.device).unsqueeze(1)  # (B, 1, P, N_KEYS)
    same = (keys.unsqueeze(2) == pk) & (pk >= 0)  # (B, C, P, N_KEYS)
    out = same.flatten(2).any(-1) | ~valid  # (B, C)
    out[torch.arange(b, device=out.device), own] = False
    return out


def layout_contrastive_loss(
    q: torch.Tensor,
    passage_emb: torch.Tensor,
    layout: CandidateLayout,
    temperature: float = 0.01,
    in_batch: bool = True,
    gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
    rank: int = 0,
) -> dict[str, torch.Tensor]:
    """`contrastive_loss` over the candidates a `CandidateLayout` describes.

    Args:
        q: (B, D) session embeddings.
        passage_emb: (R, D) the encoded passages the layout points into.
        layout: The batch's candidate layout (B examples, K hard-negative slots).
        temperature: Softmax temperature.
        in_batch: Also score every other example's candidates (across processes with `gather`).
        gather: Under DDP with in-batch negatives: concatenates a tensor over all processes in
            rank order (keeping the local part's gradient); None = one process.
        rank: This process's rank (its sessions' rows in the gathered candidates).

    Returns:
        {"contrastive": scalar loss}.
    """
    layout = layout.to(q.device)
    slots = layout.place(passage_emb)  # (B, 1 + K, D)
    keys, valid, offset = layout.keys, layout.valid, 0
    if in_batch and gather is not None:
        slots, keys, valid = gather(slots), gather(keys), gather(valid)
        offset = rank * q.shape[0]
    exclude = candidate_exclusions(layout.positive_keys, keys, valid, offset, in_batch)
    neg = slots[:, 1:] if layout.n_negatives else None  # (N, K, D)
    return contrastive_loss(q, slots[:, 0], neg, temperature, in_batch, offset, exclude)


def score_distillation_loss(
    student_scores: torch.Tensor,
    teacher_scores: torch.Tensor,
    valid: torch.Tensor | None = None,
    student_temperature: float = 0.01,
    teacher_temperature: float = 0.05,
) -> dict[str, torch.Tensor]:
    """KL(teacher || student) between two softmaxes over each session's candidates.

    The teacher (an off-the-shelf embedder, scores precomputed) ranks an example's positives and
    negatives; the student is trained towards the teacher's distribution over the same
    candidates: sum_c p_c (log p_c - log q_c), p = softmax(teacher / t_teacher),
    q = softmax(student / t_student), averaged over the sessions.

    Args:
        student_scores: (B, C) the student's similarities (dot products) of each session and
            its C candidates.
        teacher_scores: (B, C) the teacher's scores of the same candidates (NaN = none).
        valid: (B, C) bool, False = padding slot; also left out where the teacher score is NaN.
        student_temperature: Divides the student's scores (the contrastive temperature).
        teacher_temperature: Divides the teacher's scores (lower = sharper targets).

    Returns:
        {"distill": scalar loss}; rows with fewer than two candidates add 0 (nothing to rank).
    """
    if student_scores.shape != teacher_scores.shape or student_scores.dim() != 2:
        raise ValueError(
            f"student and teacher scores must both be (B, C), got "
            f"{tuple(student_scores.shape)}, {tuple(teacher_scores.shape)}"
        )
    teacher = teacher_scores.to(student_scores.device).float()
    keep = ~torch.isnan(teacher)
    if valid is not None:
        keep = keep & valid.to(keep.device)
    low = torch.finfo(torch.float32).min
    s = (student_scores.float() / student_temperature).masked_fill(~keep, low)  # (B, C)
    t = (teacher.nan_to_num(0.0) / teacher_temperature).masked_fill(~keep, low)  # (B, C)
    log_q, log_p = F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1)
    per_row = (log_p.exp() * (log_p - log_q)).masked_fill(~keep, 0.0).sum(-1)  # (B,)
    rows = keep.sum(-1) >= 2  # (B,)
    # The mean over rows that rank something, without reading the count back (no device sync).
    return {"distill": (per_row * rows).sum() / rows.sum().clamp(min=1)}


def next_token_targets(
    logits: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Align Hugging-Face-style labels with logits: position i predicts token i + 1.

    Args:
        logits: (B, L, V).
        labels: (B, L), IGNORE_INDEX = no loss.

    Returns:
        logits (B, L - 1, V) and the labels they predict (B, L - 1).
    """
    return logits[:, :-1], labels[:, 1:]


def session_masked_lm_loss(
    logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0
) -> dict[str, torch.Tensor]:
    """Token-mean cross-entropy of the response tokens generated from the session's EMB tokens.

    The session mask lives in the attention mask (`collate.csit_batch`); this is the LM loss
    over whatever logits it produced.

    Args:
        logits: (..., V) logits, already aligned with `labels` (see `next_token_targets`).
        labels: (...) target ids, IGNORE_INDEX = no loss.
        label_smoothing: Label smoothing.

    Returns:
        {"session_lm": scalar loss} (0 when no token is labelled).
    """
    flat_logits = logits.reshape(-1, logits.shape[-1]).float()  # (N, V)
    flat_labels = labels.reshape(-1)  # (N,)
    per_token = F.cross_entropy(
        flat_logits,
        flat_labels,
        ignore_index=IGNORE_INDEX,
        label_smoothing=label_smoothing,
        reduction="none",
    )  # (N,), 0 where ignored
    # The mean over labelled tokens, without reading the count back (no device sync).
    count = (flat_labels != IGNORE_INDEX).sum().clamp(min=1)
    return {"session_lm": per_token.sum() / count}


def combine_csit_losses(
    contrastive: Mapping[str, torch.Tensor],
    lm: Mapping[str, torch.Tensor] | None,
    alpha: float,
) -> dict[str, torch.Tensor]:
    """The weighted parts of L = L_C + alpha * L_S; their sum is the training loss.

    Args:
        contrastive: Output of `contrastive_loss`.
        lm: Output of `session_masked_lm_loss`, or None (alpha must then be 0).
        alpha: Weight of L_S.

    Returns:
        {"contrastive": L_C} plus {"session_lm": alpha * L_S} when alpha > 0.
    """
    parts = dict(contrastive)
    if alpha > 0:
        if lm is None:
            raise ValueError("alpha > 0 needs the session-masked LM loss")
        parts.update({name: alpha * value for name, value in lm.items()})
    return parts
