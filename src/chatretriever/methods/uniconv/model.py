"""UniConv: one chat LLM that embeds sessions and passages (its EMB tokens, as ChatRetriever) AND
writes the grounded answer from the passages it retrieved (its LM head, with the same weights).

The shared machinery (loading, saving, fingerprints, the one-pass CSIT forward, fast encoding)
is `modeling.emb_llm.EmbLLM`; UniConv adds the context-identification forward (`cii_forward`:
the log-likelihood of K candidate responses after one context, in ONE pass, `cii.py`) and the
answer path (`answer`, `answer_batch`, `answer_with_retrieval`) through the shared grounded
prompt (`modeling.grounded`), the layout its CII loss trains on (CII shows one passage cut at
`uniconv.max_passage_chars` in `uniconv.max_context_tokens`; answers show k, cut at
`max_passage_chars`, in `max_prompt_tokens`; both are fitted the same way,
`modeling.grounded_fit`). A saved UniConv is a directory with `uniconv.json` (adapter + EMB
rows: a few MB).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from chatretriever.methods.uniconv import SAVED_CONFIG
from chatretriever.methods.uniconv.cii import CiiBatch, response_logliks
from chatretriever.modeling.emb_llm import EmbLLM
from chatretriever.modeling.grounded import (
    DEFAULT_PASSAGE_CHARS,
    DEFAULT_PROMPT_TOKENS,
    GroundedGenerator,
    grounded_messages,
)
from chatretriever.modeling.grounded_fit import PromptFitter
from chatretriever.retrieval.encoders import fingerprint_of
from chatretriever.types import Passage, SessionLike, Turn, as_messages, batch


def session_turns(session: SessionLike) -> list[Turn | Mapping[str, str]]:
    """The turns of a Session, the message dicts / Turns of a message list, or one user turn
    for a question string."""
    return as_messages(session)


class UniConv(EmbLLM):
    """Retrieves for a conversation and answers it with one model (an `encoders.Encoder`).

    Build with `UniConv.from_pretrained(base chat LLM or saved dir)`. Everything an index, a
    search or a benchmark does with a ChatRetriever works with it unchanged; `answer*` generate.
    """

    SAVED_CONFIG = SAVED_CONFIG
    NAME_PREFIX = "uniconv"
    # A ChatRetriever's saved dir (the same EmbLLM body and format; method rooms do not import
    # each other, so its file name is spelled here): a UniConv recipe may start from a trained
    # session retriever (`uniconv-smol` starts from `chatretriever-smol`).
    CONTINUES_FROM = ("chatretriever.json",)
    # The answer path's prompt fitter (one per model: its cuts are counted across calls) and
    # the budgets of the last `answer_batch`; set on first use.
    _prompt_fitter: PromptFitter | None = None
    _answer_budgets: dict[str, int] | None = None

    # ------------------------------------------------------------------ training forward
    def cii_forward(self, batch: CiiBatch, normalize: str = "mean") -> torch.Tensor:
        """Log-likelihood scores (B, K) of each example's candidate responses after its
        grounded context, from one forward of the packed rows (`cii.cii_batch`).

        Args:
            batch: The packed [context, resp_1, ..., resp_K] rows and their scoring index.
            normalize: "mean" (per-token mean log-probability) or "sum".

        Returns:
            (B, K) float32; slots outside `batch.candidate_mask` score 0.
        """
        device = self.device
        dtype = next(self.model.parameters()).dtype
        self._sync_fp32_layers()
        with self.autocast():
            hidden = (
                self._base()
                .get_decoder()(
                    input_ids=batch.input_ids.to(device),
                    attention_mask=batch.additive_mask(dtype).to(device),  # (B, 1, L, L)
                    position_ids=batch.position_ids.to(device),
                    use_cache=False,
                )
                .last_hidden_state
            )  # (B, L, H)
            head = self._base().get_output_embeddings()
            return response_logliks(hidden, batch, normalize, head=head)

    def forward(  # type: ignore[override]
        self,
        sessions: Mapping[str, torch.Tensor],
        passages: Mapping[str, torch.Tensor] | None = None,
        cii: CiiBatch | None = None,
        cii_normalize: str = "mean",
    ) -> dict[str, torch.Tensor]:
        """The training forward: `EmbLLM.forward` (session embedding, LM logits of the response
        under the session mask, passage embeddings) plus "cii_scores" (B, K) when `cii` is given.
        """
        out = super().forward(sessions, passages)
        if cii is not None:
            out["cii_scores"] = self.cii_forward(cii, cii_normalize)
        return out

    # ------------------------------------------------------------------ answering
    def generator(self, **kwargs: Any) -> GroundedGenerator:
        """A `GroundedGenerator` over this model's LM (adapter included): the same weights
        that embed (kwargs: max_new_tokens, max_prompt_tokens, batch_size); its prompt fitter
        is this model's, so `answer_report` counts the cuts of every call."""
        if self._prompt_fitter is None:
            self._prompt_fitter = PromptFitter(self.tokenizer)
        return GroundedGenerator(self.model, self.tokenizer, fitter=self._prompt_fitter, **kwargs)

    def answer_report(self) -> dict[str, Any]:
        """The generation budgets of the last `answer_batch` (the prompt budget as the model's
        context allowed it) and the prompts cut so far (`grounded_fit.FitCounts`' fields); {}
        before any answer."""
        if self._answer_budgets is None or self._prompt_fitter is None:
            return {}
        return {**self._answer_budgets, **self._prompt_fitter.counts.as_dict()}

    def answer(
        self,
        session: SessionLike,
        passages: Sequence[Passage | str],
        max_new_tokens: int = 96,
        do_sample: bool = False,
        max_prompt_tokens: int = DEFAULT_PROMPT_TOKENS,
        max_passage_chars: int = DEFAULT_PASSAGE_CHARS,
        **kwargs: Any,
    ) -> str:
        """The answer to the session's last question, grounded in `passages` (numbered in the
        prompt; none = closed book). Greedy unless `do_sample`. See `answer_batch`."""
        return self.answer_batch(
            [(session, passages)],
            max_new_tokens,
            do_sample,
            max_prompt_tokens=max_prompt_tokens,
            max_passage_chars=max_passage_chars,
            **kwargs,
        )[0]

    def answer_batch(
        self,
        items: Sequence[tuple[SessionLike, Sequence[Passage | str]]],
        max_new_tokens: int = 96,
        do_sample: bool = False,
        batch_size: int = 8,
        show_progress: bool = False,
        max_passage_chars: int = DEFAULT_PASSAGE_CHARS,
        max_prompt_tokens: int = DEFAULT_PROMPT_TOKENS,
        **kwargs: Any,
    ) -> list[str]:
        """Answers to many (session, passages) pairs, in input order.

        Args:
            items: (session, passages) pairs.
            max_new_tokens: The most tokens of one answer.
            do_sample: Sample (kwargs: temperature, seed) instead of greedy decoding.
            batch_size: Prompts per generate call.
            show_progress: A progress bar over prompts.
            max_passage_chars: Each passage is cut to this many characters in the prompt.
            max_prompt_tokens: Longer prompts are fitted to this many tokens (system message
                kept, old history and the lowest-ranked passages dropped first:
                `grounded_fit.py`); lowered to leave `max_new_tokens` in the model's context.
            **kwargs: Passed to `GroundedGenerator.generate` (temperature, seed).

        Returns:
            One answer per item.
        """
        items = batch(items, "items", "(session, passages) pairs")
        for i, (_, ps) in enumerate(items):  # a bare string would be one passage per character
            batch(ps, f"items[{i}] passages", "passages (an empty list: closed book)")
        prompts = [
            grounded_messages(session_turns(s), ps, max_passage_chars, closed_book=not ps)
            for s, ps in items
        ]
        was_training = self.training
        try:
            gen = self.generator(
                max_new_tokens=max_new_tokens,
                max_prompt_tokens=max_prompt_tokens,
                batch_size=batch_size,
            )
            self._answer_budgets = {
                "max_new_tokens": gen.max_new_tokens,
                "max_prompt_tokens": gen.max_prompt_tokens,
                "max_passage_chars": max_passage_chars,
            }
            return gen.generate(prompts, do_sample=do_sample, show_progress=show_progress, **kwargs)
        finally:
            self.train(was_training)

    def answer_with_retrieval(
        self,
        session: SessionLike,
        index: Any,
        k: int = 3,
        passages: Mapping[str, Passage] | Sequence[Passage] | None = None,
        **kwargs: Any,
    ) -> tuple[str, list[tuple[str, float]]]:
        """Retrieve the top k passages for the session with this model, then answer from them.

        Args:
            session: The conversation, ending with the user's question.
            index: A `DenseIndex` built with this model's passage embeddings, or a
                `CorpusIndex` (its `.index` and `.passages` are used).
            k: Passages to retrieve and answer from.
            passages: Passage id -> passage, or a list of passages (needed when `index`
                carries no passages).
            **kwargs: Passed to `answer_batch`.

        Returns:
            (the answer, the (passage id, score) hits, best first).

        Raises:
            EncoderMismatchError: The index was built with another model's passage embeddings.
        """
        # a DenseIndex (or MilvusIndex) checks queries itself; a CorpusIndex holds one as .index
        dense = index if hasattr(index, "check_encoder") else getattr(index, "index", None)
        if not hasattr(dense, "check_encoder"):
            raise TypeError(f"index must be a DenseIndex or a CorpusIndex, got {type(index)}")
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        texts = passages if passages is not None else getattr(index, "passages", None)
        if texts is None:
            raise ValueError("answer_with_retrieval needs the passages' texts (passages=...)")
        if not isinstance(texts, Mapping):  # a list of passages, as read_corpus gives them
            texts = {p.id: p for p in texts}
        dense.check_encoder(self.name, self.dim, self.normalize, fingerprint_of(self))
        query = self.encode_sessions([session])  # (1, D)
        hits = dense.search(np.asarray(query, dtype=np.float32), k=k)[0]
        missing = [pid for pid, _ in hits if pid not in texts]
        if missing:
            raise ValueError(f"retrieved passages without text: {missing[:3]}")
        answer = self.answer_batch([(session, [texts[pid] for pid, _ in hits])], **kwargs)[0]
        return answer, hits
