"""Rabtriever: the binary-choice reranker distilled into a bi-encoder with a small predictor.

The LLM (the tuned reranker) is frozen and shared by teacher and student.
- Teacher: the reranker's full prompt (document, then conversation); its last-layer hidden state
  at the answer position `h_T` (B, H) and its two option logits (the LM head on `h_T`).
- Student: the document alone (`h_D`: the last-layer state at the document prefix's last token,
  computed once and indexed) and the query alone (`h_Q`: the same prompt with an empty document,
  at the answer position). A trainable predictor (a 2-layer MLP by default) maps `h_Q`,
  conditioned on `h_D`, to `h_P`; the LM head on `h_P` gives the student's option logits.
- Losses (named parts): `mse` between `h_P` and `h_T`, and `reverse_kl` = KL(student || teacher)
  over the two options, weighted by `kl_weight`; optionally `rank`, the within-query MSE of the
  centred log-odds of "yes" (`rank_loss`: what orders a query's candidates), weighted.

A query then costs one LLM pass over the query, whatever the number of candidates; each candidate
adds one predictor call (an MLP) and two rows of the LM head.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from chatretriever.errors import DataFormatError
from chatretriever.methods.rationale.prompts import BinaryChoicePrompt
from chatretriever.modeling.collate import pad_batch, position_ids_from_mask
from chatretriever.types import Session, SessionLike

logger = logging.getLogger(__name__)


def mse_loss(predicted: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared error over every element.

    Args:
        predicted: (B, H) the predictor's states.
        teacher: (B, H) the teacher's answer-position states.
    """
    return ((predicted.float() - teacher.float()) ** 2).mean()


def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(student || teacher) of the option distributions, averaged over the batch.

    Args:
        student_logits: (B, K) option logits of the student.
        teacher_logits: (B, K) option logits of the teacher.

    Returns:
        Scalar: mean over rows of sum_k p_s,k (log p_s,k - log p_t,k).
    """
    log_s = torch.log_softmax(student_logits.float(), dim=-1)  # (B, K)
    log_t = torch.log_softmax(teacher_logits.float(), dim=-1)  # (B, K)
    return (log_s.exp() * (log_s - log_t)).sum(dim=-1).mean()


def option_margin(logits: torch.Tensor) -> torch.Tensor:
    """The log-odds of "yes": (..., 2) option logits -> (...). Orders candidates exactly as
    log P(yes) does, without its float saturation near P = 1."""
    return logits[..., 0].float() - logits[..., 1].float()


def rank_loss(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Within-query MSE of centred scores (Margin-MSE over all of a query's candidates).

    Each query's scores minus their mean over its candidates, student against teacher: only the
    differences between a query's candidates count, never the query's overall level, so the
    loss trains what decides the ranking.

    Args:
        student: (B, G) the student's scores (`option_margin`) of each query's candidates.
        teacher: (B, G) the teacher's.
        mask: (B, G) True where a candidate exists (queries have G or fewer).

    Returns:
        Scalar: mean over queries with >= 2 candidates of the mean squared difference of the
        centred scores over their candidates; 0 when no query has two.
    """
    m = mask.float()  # (B, G)
    n = m.sum(dim=-1)  # (B,)
    per = n.clamp(min=1)[:, None]  # (B, 1)

    def centred(x: torch.Tensor) -> torch.Tensor:
        x = x.float() * m
        return (x - x.sum(dim=-1, keepdim=True) / per) * m  # (B, G)

    squared = ((centred(student) - centred(teacher)) ** 2).sum(dim=-1) / per[:, 0]  # (B,)
    keep = n >= 2
    return squared[keep].mean() if keep.any() else student.sum() * 0.0


def distill_losses(
    predicted: torch.Tensor,
    teacher: torch.Tensor,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    kl_weight: float = 1.0,
) -> dict[str, torch.Tensor]:
    """The named, weighted parts of the Rabtriever loss: {"mse", "reverse_kl"}."""
    return {
        "mse": mse_loss(predicted, teacher),
        "reverse_kl": kl_weight * reverse_kl(student_logits, teacher_logits),
    }


@dataclass
class PredictorConfig:
    """The predictor between the LLM's last hidden layer and its LM head.

    Attributes:
        hidden: The LLM's hidden size H.
        inner: The MLP's inner width (default 2H).
        layers: Linear layers (>= 1; 2 = the default MLP).
        residual: Add `h_Q` to the MLP's output (the predictor starts near the query state).
        dropout: Dropout on the MLP's input and after each hidden activation (training only).
    """

    hidden: int
    inner: int | None = None
    layers: int = 2
    residual: bool = True
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.layers < 1:
            raise ValueError(f"predictor layers must be >= 1, got {self.layers}")
        if not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"predictor dropout must be in [0, 1), got {self.dropout!r}")


class Predictor(nn.Module):
    """`h_P = [h_Q +] MLP([h_Q; h_D])`: (B, H), (B, H) -> (B, H)."""

    def __init__(self, config: PredictorConfig) -> None:
        super().__init__()
        self.config = config
        h, inner = config.hidden, config.inner or 2 * config.hidden
        dims = [2 * h] + [inner] * (config.layers - 1) + [h]
        blocks: list[nn.Module] = [nn.Dropout(config.dropout)] if config.dropout else []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            blocks.append(nn.Linear(a, b))
            if i < config.layers - 1:
                blocks.append(nn.GELU())
                if config.dropout:
                    blocks.append(nn.Dropout(config.dropout))
        self.mlp = nn.Sequential(*blocks)

    def forward(self, query: torch.Tensor, document: torch.Tensor) -> torch.Tensor:
        out = self.mlp(torch.cat([query, document], dim=-1).float())  # (B, H)
        return out + query.float() if self.config.residual else out


def _last_hidden(model: Any, seqs: Sequence[Sequence[int]], pad_id: int) -> torch.Tensor:
    """Last-layer hidden states (after the final norm) at the last token: (B, H) float32."""
    device = next(model.parameters()).device
    ids, mask = pad_batch(seqs, pad_id, padding_side="left")  # (B, L)
    out = model(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        position_ids=position_ids_from_mask(mask).to(device),
        output_hidden_states=True,
        use_cache=False,
        logits_to_keep=1,
    )
    return out.hidden_states[-1][:, -1].float()  # (B, H)


class RabtrieverEncoder:
    """The frozen LLM's three readings: teacher states, query states, document states.

    Args:
        model: The (tuned) reranker's causal LM; frozen here.
        prompt: The reranker's prompt builder.
        batch_size: Sequences per forward.
    """

    def __init__(self, model: Any, prompt: BinaryChoicePrompt, batch_size: int = 16) -> None:
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.prompt = prompt
        self.batch_size = batch_size
        tok = prompt.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        self._empty_doc = prompt.document_ids([""])[0]

    def lm_head_options(self, states: torch.Tensor) -> torch.Tensor:
        """(B, H) states -> (B, 2) option logits through the LLM's own LM head."""
        head = self.model.get_output_embeddings()
        rows = head.weight[list(self.prompt.option_ids)].float()  # (2, H)
        bias = getattr(head, "bias", None)
        logits = states.float() @ rows.T  # (B, 2)
        return logits + bias[list(self.prompt.option_ids)].float() if bias is not None else logits

    @torch.inference_mode()
    def _states(
        self, seqs: Sequence[Sequence[int]], show_progress: bool = False, desc: str = "states"
    ) -> torch.Tensor:
        """Each distinct sequence once, in length order (little padding); rows in `seqs` order."""
        unique = list(dict.fromkeys(tuple(s) for s in seqs))
        order = sorted(range(len(unique)), key=lambda i: len(unique[i]))
        hidden = self.model.get_output_embeddings().weight.shape[1]
        out = torch.empty(0, hidden)  # no sequence: (0, H), as every other encoder's nothing
        starts = range(0, len(order), self.batch_size)
        for start in tqdm(starts, desc=desc, disable=not show_progress):
            rows = order[start : start + self.batch_size]
            states = _last_hidden(self.model, [unique[i] for i in rows], self.pad_id)  # (b, H)
            if start == 0:
                out = states.new_empty(len(unique), states.shape[1])  # (U, H)
            out[rows] = states
        row_of = {s: i for i, s in enumerate(unique)}
        return out[[row_of[tuple(s)] for s in seqs]]  # (N, H)

    def teacher_states(
        self, documents: Sequence[str], sessions: Sequence[SessionLike], show_progress: bool = False
    ) -> torch.Tensor:
        """(N, H) answer-position states of the full prompts of aligned pairs."""
        docs, queries = self.prompt.document_ids(documents), self.prompt.query_ids(sessions)
        seqs = [d + q for d, q in zip(docs, queries, strict=True)]
        return self._states(seqs, show_progress, "teacher")

    def query_states(
        self, sessions: Sequence[SessionLike], show_progress: bool = False
    ) -> torch.Tensor:
        """(Q, H) answer-position states of the queries alone (an empty document)."""
        seqs = [self._empty_doc + q for q in self.prompt.query_ids(sessions)]
        return self._states(seqs, show_progress, "queries")

    def document_states(
        self, documents: Sequence[str], show_progress: bool = False
    ) -> torch.Tensor:
        """(N, H) states at each document prefix's last token (computed once, indexed)."""
        return self._states(self.prompt.document_ids(documents), show_progress, "documents")


@dataclass
class DistillFeatures:
    """Everything the predictor trains on (the LLM is frozen, so it is computed once).

    Attributes:
        query: (N, H) h_Q. document: (N, H) h_D. teacher: (N, H) h_T.
        teacher_logits: (N, 2) the teacher's option logits.
    """

    query: torch.Tensor
    document: torch.Tensor
    teacher: torch.Tensor
    teacher_logits: torch.Tensor


def distill_features(
    encoder: RabtrieverEncoder,
    documents: Sequence[str],
    sessions: Sequence[Session],
    show_progress: bool = False,
) -> DistillFeatures:
    """Teacher and student states of aligned (document, session) pairs, on the CPU."""
    teacher = encoder.teacher_states(documents, sessions, show_progress)  # (N, H)
    return DistillFeatures(
        query=encoder.query_states(sessions, show_progress).cpu(),
        document=encoder.document_states(documents, show_progress).cpu(),
        teacher=teacher.cpu(),
        teacher_logits=encoder.lm_head_options(teacher).cpu(),
    )


PREDICTOR_WEIGHTS = "predictor.safetensors"
PREDICTOR_CONFIG = "predictor.json"


def save_predictor(predictor: Predictor, directory: str | Path) -> Path:
    """Write `predictor.safetensors` and `predictor.json` (its config) atomically."""
    import json

    from safetensors.torch import save_file

    from chatretriever.io.atomic import atomic_path, atomic_write

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / PREDICTOR_WEIGHTS) as tmp:
        save_file({k: v.contiguous() for k, v in predictor.state_dict().items()}, str(tmp))
    with atomic_write(out / PREDICTOR_CONFIG) as f:
        json.dump(asdict(predictor.config), f, indent=2)
    return out


def load_predictor(directory: str | Path) -> Predictor:
    """Read a predictor written by `save_predictor`.

    Raises:
        DataFormatError: One line naming the file: missing, not JSON, an unknown or bad field,
            truncated weights, or weights that do not match the config.
    """
    import json
    from dataclasses import fields

    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    config_path, weights_path = directory / PREDICTOR_CONFIG, directory / PREDICTOR_WEIGHTS
    for path in (config_path, weights_path):
        if not path.is_file():
            raise DataFormatError(path, "not found")
    try:
        raw = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataFormatError(config_path, f"not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise DataFormatError(config_path, "expected a JSON object")
    known = {f.name for f in fields(PredictorConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise DataFormatError(config_path, f"unknown field '{unknown[0]}' (known: {sorted(known)})")
    try:
        predictor = Predictor(PredictorConfig(**raw))
    except (TypeError, ValueError) as e:
        raise DataFormatError(config_path, str(e)) from None
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError) as e:
        raise DataFormatError(weights_path, f"truncated or not a safetensors file ({e})") from None
    try:
        predictor.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[-1].strip()
        raise DataFormatError(weights_path, f"does not match {PREDICTOR_CONFIG}: {first}") from None
    return predictor.eval()


def student_scores(
    encoder: RabtrieverEncoder,
    predictor: Predictor,
    query: torch.Tensor,
    documents: torch.Tensor,
) -> torch.Tensor:
    """log P(yes) of one query against N indexed documents.

    Args:
        query: (H,) h_Q of the query.
        documents: (N, H) h_D of the candidates.

    Returns:
        (N,) scores.
    """
    with torch.inference_mode():
        predicted = predictor(query.expand(documents.shape[0], -1), documents)  # (N, H)
        return torch.log_softmax(encoder.lm_head_options(predicted), dim=-1)[:, 0]
