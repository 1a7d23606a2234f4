"""Token ids -> padded tensors, LM labels and the session-masked attention mask (pure functions).

A CSIT batch carries no (B, 1, L, L) mask: it carries the lengths the mask is made of (the 2D
padding mask, and per row how many session tokens the response side must not see and where the
response side starts). `csit_mask` builds the mask from them on whatever device the batch is on
(the model calls it on the accelerator), as a FLOAT additive mask (B, 1, L, L): 0 = may attend,
`torch.finfo(dtype).min` = blocked. Not boolean (eager attention misreads it) and not -inf (fully
blocked rows give NaN). Padding is folded into it, and `position_ids` are always passed
explicitly, so the standard transformers path (`attention_mask=` 4D) works on Llama, Qwen2, ...
with no patched model file.

CSIT row rules for one example laid out as [session (S), session EMB (t), response side (R)]
where the response side is the assistant header, the response and its end-of-turn tokens:
- session rows and session EMB rows: causal over the session (so their hidden states equal a
  standalone encoding of the session);
- every response-side row (header/separator rows included): the t session EMB tokens and earlier
  response-side tokens only, never a session token;
- padding rows attend to themselves only (no NaN); no real row attends to padding.
The "vanilla" variant (plain instruction tuning) is a causal mask over the same sequence.
Sliding-window layers (Gemma3, Mistral) receive this same mask without a window: session rows
still equal a standalone encoding as long as the session fits in the window.

Inference batching (the fast path, `fast_encode`): texts grouped by a token budget over
length-sorted texts (`budget_batches`), or packed several to a row (`pack_rows`) as tensors with
a block-diagonal causal mask and positions restarting at each text (`packed_batch`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from chatretriever.modeling.losses import IGNORE_INDEX
from chatretriever.modeling.template import CsitPieces

MASK_MODES = ("csit", "vanilla")


def pad_batch(
    seqs: Sequence[Sequence[int]], pad_id: int, padding_side: str = "right"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token id lists to one length.

    Args:
        seqs: B lists of token ids.
        pad_id: Id written into padding positions (never attended).
        padding_side: "right" or "left".

    Returns:
        input_ids (B, L) long and attention_mask (B, L) long (1 = token, 0 = padding).
    """
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    if not seqs or any(len(s) == 0 for s in seqs):
        raise ValueError("pad_batch needs at least one sequence and no empty sequence")
    length = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for b, s in enumerate(seqs):
        span = slice(0, len(s)) if padding_side == "right" else slice(length - len(s), length)
        ids[b, span] = torch.as_tensor(list(s), dtype=torch.long)
        mask[b, span] = 1
    return ids, mask


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions 0, 1, ... over the real tokens of each row (padding gets 0).

    Args:
        attention_mask: (B, L) with 1 for tokens.

    Returns:
        (B, L) long; identical for the same sequence under left or right padding.
    """
    pos = attention_mask.long().cumsum(dim=-1) - 1  # (B, L)
    return pos.clamp(min=0) * attention_mask.long()


def encode_batch(
    seqs: Sequence[Sequence[int]], pad_id: int, padding_side: str = "right"
) -> dict[str, torch.Tensor]:
    """A standalone encoding batch (sessions or passages, each ending with its EMB tokens).

    Returns:
        {"input_ids": (B, L), "attention_mask": (B, L), "position_ids": (B, L)}.
    """
    ids, mask = pad_batch(seqs, pad_id, padding_side)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids_from_mask(mask)}


def last_token_positions(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, token_id: int
) -> torch.Tensor:
    """Index of the last real occurrence of `token_id` in each row, whatever the padding side.

    Args:
        input_ids: (B, L).
        attention_mask: (B, L), 1 for tokens.
        token_id: The token to find (the last EMB token).

    Returns:
        (B,) long positions. Raises ValueError when a row lacks the token.
    """
    hits = (input_ids == token_id) & attention_mask.bool()  # (B, L)
    if not bool(hits.any(dim=-1).all()):
        rows = (~hits.any(dim=-1)).nonzero().flatten().tolist()
        raise ValueError(f"rows {rows} contain no EMB token {token_id}")
    idx = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    return torch.where(hits, idx, -1).max(dim=-1).values


def csit_allowed(
    attention_mask: torch.Tensor,
    masked_session_lens: torch.Tensor,
    response_starts: torch.Tensor,
) -> torch.Tensor:
    """Boolean "row may attend to column" matrices of CSIT sequences, on the inputs' device.

    Positions count real tokens (as `position_ids_from_mask`), so either padding side works.

    Args:
        attention_mask: (B, L), 1 = token, 0 = padding.
        masked_session_lens: (B,) how many leading tokens (the session) response-side rows must
            not see: S under "csit", 0 under "vanilla" (plain causal).
        response_starts: (B,) position of the first response-side row (S + t).

    Returns:
        (B, L, L) bool, True = attend.
    """
    real = attention_mask.bool()  # (B, L)
    pos = position_ids_from_mask(attention_mask)
    row, col = pos.unsqueeze(2), pos.unsqueeze(1)  # (B, L, 1), (B, 1, L)
    allowed = (col <= row) & real.unsqueeze(2) & real.unsqueeze(1)  # causal over real tokens
    hidden = (row >= response_starts.view(-1, 1, 1)) & (col < masked_session_lens.view(-1, 1, 1))
    eye = torch.eye(real.shape[1], dtype=torch.bool, device=real.device)
    return (allowed & ~hidden) | (eye & ~real.unsqueeze(2))  # padding rows: themselves only


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B, L, L) bool -> (B, 1, L, L) float: 0 where allowed, finfo(dtype).min where blocked."""
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min).unsqueeze(1)


def csit_mask(batch: Mapping[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """The (B, 1, L, L) additive mask of a `csit_batch`, built where the batch's tensors are."""
    allowed = csit_allowed(
        batch["attention_mask"], batch["masked_session_lens"], batch["response_starts"]
    )
    return additive_mask(allowed, dtype)


def csit_batch(
    examples: Sequence[CsitPieces], pad_id: int, mode: str = "csit"
) -> dict[str, torch.Tensor]:
    """Pad CSIT sequences (right) and build labels, positions and what the mask is made of.

    Args:
        examples: B CsitPieces from `RetrievalTemplate.csit_pieces`.
        pad_id: Padding token id.
        mode: "csit" (session-masked) or "vanilla" (plain causal).

    Returns:
        {"input_ids": (B, L), "attention_mask": (B, L) (1 = token), "position_ids": (B, L),
        "labels": (B, L) = input ids on the trained response tokens, IGNORE_INDEX elsewhere
        (not shifted), "session_emb_pos": (B,) position of each session's last EMB token,
        "masked_session_lens": (B,) and "response_starts": (B,) (see `csit_allowed`; the 4D
        mask is `csit_mask(batch, dtype)`)}.
    """
    if mode not in MASK_MODES:
        raise ValueError(f"mask mode must be one of {MASK_MODES}, got {mode!r}")
    if len({ex.n_emb for ex in examples}) > 1:
        raise ValueError("all CSIT examples of a batch must use the same number of EMB tokens")
    ids, mask2d = pad_batch([ex.input_ids for ex in examples], pad_id, "right")
    labels = torch.full_like(ids, IGNORE_INDEX)
    for b, ex in enumerate(examples):
        labels[b, ex.label_start : ex.label_end] = ids[b, ex.label_start : ex.label_end]
    masked = [ex.session_len if mode == "csit" else 0 for ex in examples]
    return {
        "input_ids": ids,
        "attention_mask": mask2d,
        "position_ids": position_ids_from_mask(mask2d),
        "labels": labels,
        "session_emb_pos": torch.tensor([ex.session_emb_pos for ex in examples]),
        "masked_session_lens": torch.tensor(masked, dtype=torch.long),
        "response_starts": torch.tensor([ex.response_start for ex in examples]),
    }


# ---------------------------------------------------------- inference batching (fast_encode)
def budget_batches(lengths: Sequence[int], budget: int, max_batch: int) -> list[list[int]]:
    """Indices grouped longest first so that rows x longest length <= budget (one text may
    exceed it alone).

    Args:
        lengths: Token count of each text.
        budget: Padded tokens per batch.
        max_batch: Texts per batch at most.

    Returns:
        Batches of indices into `lengths`, every index once.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        batch = batches[-1] if batches else None
        # Sorted longest first: the batch's first text is its longest.
        fits = batch and len(batch) < max_batch and (len(batch) + 1) * lengths[batch[0]] <= budget
        if fits:
            batch.append(i)
        else:
            batches.append([i])
    return batches


def pack_rows(lengths: Sequence[int], row_len: int) -> list[list[int]]:
    """First-fit decreasing: texts into rows of at most `row_len` tokens (a longer text alone).

    Returns:
        Rows, each a list of text indices in the order they are laid out.
    """
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, room in enumerate(free):
            if lengths[i] <= room:
                rows[r].append(i)
                free[r] -= lengths[i]
                break
        else:
            rows.append([i])
            free.append(row_len - lengths[i])
    return rows


def packed_batch(
    rows: Sequence[Sequence[Sequence[int]]], pad_id: int, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """Tensors of packed rows: each row holds several texts back to back, then padding.

    Args:
        rows: R rows, each a list of token id lists.
        pad_id: Id of padding positions.
        dtype: Dtype of the additive mask.

    Returns:
        {"input_ids": (R, L), "position_ids": (R, L) restarting at 0 for each text,
        "attention_mask": (R, 1, L, L) additive: causal within a text, nothing across texts,
        padding rows attend to themselves; "last": (N, 2) (row, position) of each text's last
        token, texts in row-major order}.
    """
    length = max(sum(len(s) for s in row) for row in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    pos = torch.zeros((len(rows), length), dtype=torch.long)
    segment = torch.full((len(rows), length), -1, dtype=torch.long)  # text number, -1 = pad
    last = []
    for r, row in enumerate(rows):
        start = 0
        for k, seq in enumerate(row):
            span = slice(start, start + len(seq))
            ids[r, span] = torch.as_tensor(list(seq), dtype=torch.long)
            pos[r, span] = torch.arange(len(seq))
            segment[r, span] = k
            start += len(seq)
            last.append((r, start - 1))
    causal = torch.ones(length, length, dtype=torch.bool).tril()  # (L, L)
    same = segment[:, :, None] == segment[:, None, :]  # (R, L, L)
    real = (segment >= 0)[:, :, None]
    allowed = causal & same & real | torch.eye(length, dtype=torch.bool)  # pad rows: self only
    return {
        "input_ids": ids,
        "position_ids": pos,
        "attention_mask": additive_mask(allowed, dtype),
        "last": torch.tensor(last, dtype=torch.long),
    }
