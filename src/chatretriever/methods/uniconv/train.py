"""UniConv training: the collator, the named loss parts and the trainer.

One step on B examples (each a session, its positives and hard negatives, and a reference
response; `io.training`):
- L_R ("retrieval"): InfoNCE between the session embedding and the passages (the positive of
  this epoch, hard negatives, in-batch negatives): `modeling.losses.layout_contrastive_loss`.
- L_G ("generation"): the reference response generated after the session under the session
  mask: the SAME forward as the session embedding (`EmbLLM.csit_forward`), as CSIT's L_S.
- L_CII ("cii", weight alpha): the grounded prompt (session + its positive passage, in the
  layout `answer` uses: "[1] title: text"; but one passage, where `answer` shows k, cut at
  `uniconv.max_passage_chars`, where `answer` cuts at 1200, and fitted to `max_context_tokens`
  tokens as `answer` fits its prompts: system message and generation prompt kept, old history
  dropped in whole exchanges, then the passage's end and the question's start cut,
  `modeling.grounded_fit`) followed by the reference response and the references of
  `cii_negatives` OTHER examples of the batch (never a copy of its own reference); the
  reference must score highest. Scored by the mean token
  log-likelihood of each response ("likelihood", the default: it trains the generation path
  that answers, so the model learns to answer from the passage in its context), all K
  responses in ONE forward that computes the context once (`cii.py`); or by embeddings
  ("embedding": the grounded prompt's EMB embedding against the responses' passage embeddings,
  InfoNCE), which trains the retrieval space instead and never touches the LM head.
Optional, off by default ("grounded", weight `uniconv.grounded_weight`): the reference response's
negative log-likelihood after the grounded prompt, i.e. the answer path itself trained as a
language model; read from the L_CII forward's reference column, so it costs nothing more.
An example without a reference response has no L_CII row and its L_G target is its first
positive (what a format-mismatched source, e.g. TopiOCQA's answer-as-passage, can offer).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from chatretriever.config import LossConfig
from chatretriever.io.training import TrainingExample
from chatretriever.methods.uniconv.cii import CiiBatch, cii_batch, cii_row
from chatretriever.methods.uniconv.losses import cii_loss, grounded_lm_loss
from chatretriever.modeling.candidates import contrastive_batch, layout_contrastive_part
from chatretriever.modeling.collate import encode_batch
from chatretriever.modeling.grounded import grounded_messages
from chatretriever.modeling.grounded_fit import PromptFitter
from chatretriever.modeling.losses import (
    IGNORE_INDEX,
    contrastive_loss,
    session_masked_lm_loss,
)
from chatretriever.modeling.template import RetrievalTemplate
from chatretriever.modeling.trainer import NamedLossTrainer
from chatretriever.types import Passage

CII_SCORES = ("likelihood", "embedding")


@dataclass
class UniConvSettings:
    """UniConv's own loss settings (the recipe's `uniconv:` section).

    Attributes:
        alpha: Weight of L_CII (0 = the "w/o CII" ablation).
        retrieval_weight: Weight of L_R (0 = generation-only).
        cii_negatives: Other examples' reference responses per example in L_CII.
        cii_score: "likelihood" (default) or "embedding" (see the module docstring).
        cii_normalize: "mean" (per-token mean log-likelihood: long and short responses compete
            on equal terms) or "sum" (the sequence log-likelihood).
        cii_temperature: Softmax temperature of L_CII.
        max_context_tokens: The grounded prompt is fitted to this many tokens (system message
            kept; `modeling.grounded_fit`).
        max_passage_chars: The positive passage is cut to this many characters in the prompt.
        grounded_weight: Weight of the grounded-generation part (the reference's token-mean NLL
            after the grounded prompt, from the L_CII forward; 0 = off, the paper's recipe).
    """

    alpha: float = 0.5
    retrieval_weight: float = 1.0
    cii_negatives: int = 3
    cii_score: str = "likelihood"
    cii_normalize: str = "mean"
    cii_temperature: float = 1.0
    max_context_tokens: int = 512
    max_passage_chars: int = 800
    grounded_weight: float = 0.0

    def __post_init__(self) -> None:
        if self.alpha < 0 or self.retrieval_weight < 0 or self.grounded_weight < 0:
            raise ValueError(
                "uniconv.alpha, uniconv.retrieval_weight and uniconv.grounded_weight must be >= 0"
            )
        if self.grounded_weight > 0 and self.cii_score != "likelihood":
            raise ValueError(
                "uniconv.grounded_weight > 0 needs uniconv.cii_score: likelihood (the grounded "
                f"part reads the likelihood forward), got {self.cii_score!r}"
            )
        if self.cii_score not in CII_SCORES:
            raise ValueError(
                f"uniconv.cii_score must be one of {CII_SCORES}, got {self.cii_score!r}"
            )
        if self.cii_normalize not in ("mean", "sum"):
            raise ValueError(
                f"uniconv.cii_normalize must be 'mean' or 'sum', got {self.cii_normalize!r}"
            )
        if self.cii_negatives < 1:
            raise ValueError(f"uniconv.cii_negatives must be >= 1, got {self.cii_negatives}")
        if self.cii_temperature <= 0 or self.max_context_tokens < 16 or self.max_passage_chars < 1:
            raise ValueError(
                "uniconv: cii_temperature > 0, max_context_tokens >= 16, max_passage_chars >= 1"
            )


def has_reference(ex: TrainingExample) -> bool:
    """Whether an example carries a reference response of its own (not a stand-in passage)."""
    return bool(ex.target and ex.target.strip())


@dataclass
class UniConvCollator:
    """TrainingExamples -> {"sessions", "passages", "layout"} (as CSIT) + "cii" (a `CiiBatch`,
    or the grounded prompts and responses under cii_score="embedding"), "cii_rows" (which
    examples have an L_CII row)."""

    template: RetrievalTemplate
    tokenizer: Any
    loss: LossConfig
    settings: UniConvSettings
    pad_id: int
    padding_side: str = "right"
    max_response_len: int = 128
    seed: int = 0
    epoch: int = 0
    _fitter: PromptFitter | None = field(default=None, init=False, repr=False)

    @property
    def fitter(self) -> PromptFitter:
        """The fitter of the grounded prompts (its `counts` say what was cut)."""
        if self._fitter is None:
            self._fitter = PromptFitter(self.tokenizer)
        return self._fitter

    def set_epoch(self, epoch: int, seed: int | None = None) -> None:
        self.epoch = epoch
        if seed is not None:
            self.seed = seed

    def __call__(self, examples: Sequence[TrainingExample]) -> dict[str, Any]:
        sessions = [[t.to_dict() for t in ex.messages] for ex in examples]
        batch, passages = contrastive_batch(
            self.template,
            examples,
            sessions,
            self.loss,
            self.pad_id,
            self.padding_side,
            self.seed,
            self.epoch,
        )
        if self.settings.alpha > 0 or self.settings.grounded_weight > 0:
            batch.update(self.cii_inputs(examples, passages, batch["layout"].rows[:, 0].tolist()))
        return batch

    def contexts(self, examples: Sequence[TrainingExample], positives: Sequence[Any]) -> list:
        """The grounded prompt of each example (its session + its positive of this epoch,
        titled as `answer` shows a passage: "[1] title: text")."""
        return [
            grounded_messages(
                list(ex.messages),
                [Passage(p.id or "positive", p.text, title=p.title)],
                self.settings.max_passage_chars,
            )
            for ex, p in zip(examples, positives, strict=True)
        ]

    def cii_inputs(
        self, examples: Sequence[TrainingExample], passages: Sequence[Any], pos_rows: list[int]
    ) -> dict[str, Any]:
        """L_CII inputs of the examples with a reference response and >= 1 other reference
        (>= 0 others when only the grounded part reads them)."""
        rows = [i for i, ex in enumerate(examples) if has_reference(ex)]
        contrasts = self.settings.alpha > 0
        if len(rows) < (2 if contrasts else 1):  # nothing to contrast with
            return {"cii": None, "cii_rows": []}
        prompts = self.contexts([examples[i] for i in rows], [passages[pos_rows[i]] for i in rows])
        refs = [str(examples[i].target) for i in rows]
        if self.settings.cii_score == "embedding":
            # The session side of the retriever's template (its own system prompt, no answer
            # instruction): the grounded conversation without GROUNDED_SYSTEM.
            ctx = self.template.session_ids_batch([p[1:] for p in prompts])
            resp = self.template.passage_ids_batch(refs)
            same = [[_same_response(a, b) for b in refs] for a in refs]
            return {
                "cii": {
                    "contexts": encode_batch(ctx, self.pad_id, self.padding_side),
                    "responses": encode_batch(resp, self.pad_id, self.padding_side),
                    # (B', B') another example's copy of a reference is not an incorrect one
                    "exclude": torch.tensor(same) & ~torch.eye(len(refs), dtype=torch.bool),
                },
                "cii_rows": rows,
            }
        return {"cii": self._packed(prompts, refs), "cii_rows": rows}

    def _packed(self, prompts: list, refs: list[str]) -> CiiBatch:
        """One packed row per example: [grounded prompt, its reference, K - 1 other references]."""
        tok = self.tokenizer
        # the prompt `answer` would build, fitted as `answer` fits it (a raw cut of its last
        # tokens would drop the system message and start mid-turn)
        contexts = self.fitter.fit_batch(prompts, self.settings.max_context_tokens)
        # A response ends with the stop token generation ends at (the LM learns where to stop).
        eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
        cap = max(1, self.max_response_len - len(eos))
        # a reference is user text too: a literal "<|im_end|>" in it stays text
        responses = [ids[:cap] + eos for ids in self.fitter.contents.encode(refs)]
        contrasts = self.settings.alpha > 0  # else only the grounded part reads the references
        k = min(self.settings.cii_negatives if contrasts else 0, len(refs) - 1)
        out = []
        for i, ctx in enumerate(contexts):
            others = [responses[j] for j in _other_responses(i, refs, k)]
            out.append(cii_row(ctx, [responses[i], *others]))
        return cii_batch(out, self.pad_id)


def _same_response(a: str, b: str) -> bool:
    """Whether two references are the same response (up to surrounding whitespace)."""
    return a.strip() == b.strip()


def _other_responses(i: int, refs: Sequence[str], k: int) -> list[int]:
    """The next k examples after i (cyclic) whose reference is not example i's own: a copy of
    the reference ("yes" twice in a batch) is not an incorrect response. Fewer when the batch
    has fewer (a row with the reference alone adds nothing to L_CII)."""
    out: list[int] = []
    for step in range(1, len(refs)):
        j = (i + step) % len(refs)
        if len(out) < k and not _same_response(refs[j], refs[i]):
            out.append(j)
    return out


def uniconv_losses(
    model: Any, inputs: Mapping[str, Any], loss: LossConfig, settings: UniConvSettings
) -> dict[str, torch.Tensor]:
    """The named, weighted loss parts of one step: {"retrieval", "generation", "cii",
    "grounded"} (a part whose weight is 0 is left out); their sum is L_R + L_G + alpha * L_CII
    (+ grounded_weight * the grounded NLL when it is on)."""
    cii = inputs.get("cii")
    packed = cii if isinstance(cii, CiiBatch) else None
    out = model(
        sessions=inputs["sessions"],
        passages=inputs["passages"],
        cii=packed,
        cii_normalize=settings.cii_normalize,
    )
    parts: dict[str, torch.Tensor] = {}
    if settings.retrieval_weight > 0:
        contrastive = layout_contrastive_part(
            out["session_emb"], out["passage_emb"], inputs["layout"], loss
        )
        parts["retrieval"] = settings.retrieval_weight * contrastive
    if loss.uses_lm and loss.alpha > 0:
        lm = session_masked_lm_loss(out["lm_logits"], out["lm_labels"], loss.label_smoothing)
        parts["generation"] = loss.alpha * lm["session_lm"]
    if settings.grounded_weight > 0 and packed is not None:
        ref = out["cii_scores"][:, 0]  # (B',) the reference after its grounded prompt
        if settings.cii_normalize == "sum":
            ref = ref / packed.candidate_tokens()[:, 0].clamp(min=1).to(ref.device)
        grounded = grounded_lm_loss(ref, packed.candidate_mask[:, 0])["grounded"]
        parts["grounded"] = settings.grounded_weight * grounded
    if settings.alpha > 0 and cii is not None:
        if packed is not None:
            scores = out["cii_scores"] / settings.cii_temperature  # (B', K)
            part = cii_loss(scores, packed.candidate_mask.to(scores.device))["cii"]
        else:
            ctx = model.embed(cii["contexts"])  # (B', D)
            resp = model.embed(cii["responses"])  # (B', D)
            exclude = cii.get("exclude")
            if exclude is not None:
                exclude = exclude.to(ctx.device)
            part = contrastive_loss(ctx, resp, temperature=loss.temperature, exclude=exclude)[
                "contrastive"
            ]
        parts["cii"] = settings.alpha * part
    if not parts:
        raise ValueError("every UniConv loss part has weight 0")
    return parts


@dataclass
class UniConvLoss:
    """UniConv's `NamedLossFn`."""

    loss: LossConfig
    settings: UniConvSettings

    def __call__(self, model: Any, inputs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        return uniconv_losses(model, inputs, self.loss, self.settings)

    def token_counts(self, inputs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """{"generation": the response tokens L_G averages over}: the trainer makes it a
        token mean over a whole step (accumulated micro-batches, every process); {} without
        L_G."""
        labels = inputs["sessions"].get("labels") if self.loss.uses_lm else None
        if labels is None or self.loss.alpha <= 0:
            return {}
        return {"generation": (labels[:, 1:] != IGNORE_INDEX).sum()}  # the targets predicted


class UniConvTrainer(NamedLossTrainer):
    """The shared `NamedLossTrainer` with L_R + L_G + alpha * L_CII (each part logged)."""

    def __init__(
        self, *args: Any, loss_config: LossConfig, settings: UniConvSettings, **kwargs: Any
    ) -> None:
        super().__init__(*args, loss_fn=UniConvLoss(loss_config, settings), **kwargs)
        self.loss_config = loss_config


def make_collator(model: Any, loss: LossConfig, settings: UniConvSettings) -> UniConvCollator:
    """The collator matching a UniConv's template, tokenizer and padding."""
    return UniConvCollator(
        template=model.template,
        tokenizer=model.tokenizer,
        loss=loss,
        settings=settings,
        pad_id=model.pad_id,
        padding_side=model.padding_side,
        max_response_len=model.config.max_response_len,
    )
