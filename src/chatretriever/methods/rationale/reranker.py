"""The binary-choice LLM reranker (RaHoRe): score = log P(yes) over the two options.

A general pipeline stage: `rerank` reorders the top-k of any first-stage run. With `reuse_kv`
(the default) the (query, document) pairs are grouped by document: the prefix of a document
that several queries retrieved is run once and its KV cache serves each of them (for the 8
ESConv strategies: once per run), the queries going through in batches; the pairs of a
document only one query retrieved go in batches of whole prompts, as without `reuse_kv`.

The tuned adapter is a directory or a built-in name ("rahore-smol"); how it is resolved, checked
and loaded is `tuned_adapter`'s. Its prompts are cut at the budgets it was tuned with (its saved
recipe, `tuned_adapter.resolve_budgets`) unless the caller gives others.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from chatretriever.methods.rationale.prompts import (
    BinaryChoicePrompt,
    DocumentLike,
    choice_wording,
)
from chatretriever.methods.rationale.scoring import (
    cached_option_logits,
    option_logits,
    prefix_kv,
    relevance_scores,
)
from chatretriever.methods.rationale.tuned_adapter import (
    check_adapter_budgets,
    check_adapter_recipe,
    check_adapter_weights,
    load_checked_adapter,
    resolve_adapter,
    resolve_budgets,
)
from chatretriever.types import Run, Session, SessionLike, batch, passage_text, passage_texts

logger = logging.getLogger(__name__)


class BinaryChoiceReranker:
    """Scores (document, conversation) pairs with one forward pass per batch, no `generate`.

    Args:
        model: A causal chat LM (plain or with a peft adapter), in eval mode.
        tokenizer: Its tokenizer.
        prompt: The prompt builder (default: the "ab" wording).
        batch_size: Pairs per forward pass.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        prompt: BinaryChoicePrompt | None = None,
        batch_size: int = 16,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.prompt = prompt or BinaryChoicePrompt(tokenizer)
        self.batch_size = batch_size
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        adapter: str | Path | None = None,
        wording: str = "ab",
        dtype: str | None = None,
        device: str | None = None,
        batch_size: int = 16,
        max_document_tokens: int | None = None,
        max_query_tokens: int | None = None,
        **prompt_kwargs: Any,
    ) -> BinaryChoiceReranker:
        """Load a chat backbone offline (built-in name, local dir or .gguf), optionally with a
        tuned LoRA adapter, on `device` (default: the accelerator, else the CPU).

        Args:
            name_or_path: See `modeling.backbones.load_backbone`.
            adapter: A peft adapter dir (`tuning.run_sft` / `run_dpo` output) or a built-in
                adapter name ("rahore-smol"); see `resolve_adapter`. Checked against the
                backbone and wording it was tuned with (`check_adapter_recipe`).
            wording: "ab" or "tf" (`prompts.WORDINGS`); another name is refused before the
                backbone loads.
            dtype: None (fp32), "bf16", "auto", ...
            device: Where to run.
            batch_size: Pairs per forward.
            max_document_tokens: Where a document is cut; None: the adapter's tuned budget
                (`tuned_budgets`), else `BinaryChoicePrompt`'s default. A budget given that
                differs from the tuned one wins, with a warning (`check_adapter_budgets`).
            max_query_tokens: Where a conversation is cut (kept from its end); None: likewise.
            **prompt_kwargs: Other `BinaryChoicePrompt` arguments (system_prompt).

        Raises:
            FileNotFoundError: A built-in adapter this install does not ship.
            ValueError: An unknown wording; a bad adapter (`resolve_adapter`,
                `check_adapter_recipe`, `check_adapter_weights`, `load_checked_adapter`).
        """
        from chatretriever.modeling.backbones import checked_device, load_backbone

        target = checked_device(device)  # before the backbone loads
        choice_wording(wording)  # likewise: a misspelt wording costs no load
        adapter_dir = None if adapter is None else resolve_adapter(adapter)
        if adapter_dir is not None:  # before the backbone loads: a refusal costs nothing
            check_adapter_recipe(adapter_dir, name_or_path, wording)
            check_adapter_weights(adapter_dir)
        model, tokenizer = load_backbone(name_or_path, kind="causal", dtype=dtype)
        if adapter_dir is not None:
            model = load_checked_adapter(model, adapter_dir, name_or_path)
        model.to(target)
        budgets = resolve_budgets(
            adapter_dir, max_document_tokens=max_document_tokens, max_query_tokens=max_query_tokens
        )
        prompt = BinaryChoicePrompt(tokenizer, wording, **budgets, **prompt_kwargs)
        if adapter_dir is not None:
            check_adapter_budgets(adapter_dir, prompt)
        return cls(model, tokenizer, prompt, batch_size)

    def score_pairs(
        self, documents: Sequence[DocumentLike], sessions: Sequence[SessionLike]
    ) -> np.ndarray:
        """Scores of aligned pairs, whole prompts per batch (no KV reuse).

        Args:
            documents: Document texts, or `Passage`s / {title?, text} mappings (their
                `passage_text`).
            sessions: `Session`s, lists of {role, content} messages or question strings.

        Returns:
            (N,) float32 log P(yes).

        Raises:
            TypeError: One document or session given bare (not in a list), or a bad item.
            ValueError: Not as many documents as sessions.
        """
        documents = passage_texts(documents, "documents")
        sessions = batch(sessions, "sessions", "sessions")
        if len(documents) != len(sessions):
            raise ValueError(f"{len(documents)} documents for {len(sessions)} sessions")
        prefixes = self.prompt.document_ids(documents)
        suffixes = self.prompt.query_ids(sessions)
        out = np.zeros(len(documents), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, len(documents), self.batch_size):
                rows = range(start, min(start + self.batch_size, len(documents)))
                seqs = [prefixes[i] + suffixes[i] for i in rows]
                logits = option_logits(self.model, seqs, self.prompt.option_ids, self.pad_id)
                out[start : start + len(seqs)] = relevance_scores(logits).cpu().numpy()
        return out

    def score_document(self, document: DocumentLike, sessions: Sequence[SessionLike]) -> np.ndarray:
        """Scores of one document against many sessions; its KV cache is computed once.

        Args:
            document: One document text, `Passage` or {title?, text} mapping.
            sessions: As `score_pairs`.

        Returns:
            (Q,) float32 log P(yes).
        """
        if not isinstance(document, (str, Mapping)) and not hasattr(document, "text"):
            raise TypeError(
                f"document must be one document text or Passage, got a {type(document).__name__}"
                " (score_matrix scores several)"
            )
        suffixes = self.prompt.query_ids(sessions)
        kv = prefix_kv(self.model, self.prompt.document_ids([document])[0])
        out = np.zeros(len(suffixes), dtype=np.float32)
        for start in range(0, len(suffixes), self.batch_size):
            batch = suffixes[start : start + self.batch_size]
            logits = cached_option_logits(
                self.model, [kv] * len(batch), batch, self.prompt.option_ids, self.pad_id
            )
            out[start : start + len(batch)] = relevance_scores(logits).cpu().numpy()
        return out

    def score_matrix(
        self,
        documents: Sequence[DocumentLike],
        sessions: Sequence[SessionLike],
        reuse_kv: bool = True,
        show_progress: bool = False,
    ) -> np.ndarray:
        """Every document against every session (e.g. the 8 strategies).

        Args:
            documents: As `score_pairs`.
            sessions: As `score_pairs`.
            reuse_kv: One KV cache per document (`score_document`), else whole prompts.
            show_progress: A progress bar over documents.

        Returns:
            (Q, D) float32 log P(yes).
        """
        documents = passage_texts(documents, "documents")
        sessions = batch(sessions, "sessions", "sessions")
        out = np.zeros((len(sessions), len(documents)), dtype=np.float32)  # (Q, D)
        for j, doc in enumerate(tqdm(documents, desc="rerank", disable=not show_progress)):
            if reuse_kv:
                out[:, j] = self.score_document(doc, sessions)
            else:
                out[:, j] = self.score_pairs([doc] * len(sessions), sessions)
        return out

    def rerank(
        self,
        run: Run,
        documents: Mapping[str, DocumentLike],
        sessions: Sequence[Session],
        k: int = 20,
        reuse_kv: bool = True,
        show_progress: bool = False,
    ) -> Run:
        """Rerank the top-k of each query of a first-stage run.

        Args:
            run: The first-stage run.
            documents: Doc id -> the text the prompt shows, or a `Passage` / {title?, text}
                mapping (its `passage_text`).
            sessions: The queries (`Session`s: their ids meet the run's); run queries without
                a session raise.
            k: How many of each query's top documents are reranked (and kept).
            reuse_kv: Group pairs by document and reuse the KV cache of each document that
                several queries retrieved (a document of one query is scored in the batches
                of whole prompts: its cache would serve nothing).
            show_progress: A progress bar over documents (reuse) or batches.

        Returns:
            A Run of the top-k of each query, scored by log P(yes), named "<run>.rahore".

        Raises:
            TypeError: `documents` not a mapping, a session not a `Session`, a document of
                another type.
            ValueError: k < 1, a run query without a session, a run document not in
                `documents`.
        """
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        by_id = _sessions_by_id(sessions)
        if not isinstance(documents, Mapping):
            raise TypeError(
                f"documents must be a mapping of doc id -> text or Passage, "
                f"got a {type(documents).__name__}"
            )
        missing = sorted(q for q in run.scores if q not in by_id)
        if missing:
            raise ValueError(f"the run has {len(missing)} queries with no session: {missing[:5]}")
        pairs = [(q, d.doc_id) for q in sorted(run.scores) for d in run.ranked(q)[:k]]
        unknown = sorted({d for _, d in pairs if d not in documents})
        if unknown:
            raise ValueError(f"{len(unknown)} run documents are not in the corpus: {unknown[:5]}")
        texts = _document_texts(documents, {d for _, d in pairs})
        scores: dict[str, dict[str, float]] = {q: {} for q in run.scores}
        whole = pairs
        if reuse_kv:
            by_doc: dict[str, list[str]] = {}
            for q, d in pairs:
                by_doc.setdefault(d, []).append(q)
            # a cache pays off for a document several queries retrieved; one query's document
            # would cost two batch-1 forwards: it goes with the whole prompts, batched
            shared = {d: qs for d, qs in by_doc.items() if len(qs) > 1}
            whole = [(qs[0], d) for d, qs in by_doc.items() if len(qs) == 1]
            for d, qs in tqdm(shared.items(), desc="rerank", disable=not show_progress):
                values = self.score_document(texts[d], [by_id[q] for q in qs])
                for q, v in zip(qs, values, strict=True):
                    scores[q][d] = float(v)
        if whole:
            values = self.score_pairs([texts[d] for _, d in whole], [by_id[q] for q, _ in whole])
            for (q, d), v in zip(whole, values, strict=True):
                scores[q][d] = float(v)
        logger.info("reranked %d pairs of %d queries", len(pairs), len(run.scores))
        return Run(scores, f"{run.name}.rahore")


def _sessions_by_id(sessions: Sequence[Session]) -> dict[str, Session]:
    """`rerank`'s queries by id: Sessions only, since the run's query ids must meet theirs."""
    out = {}
    for i, s in enumerate(batch(sessions, "sessions", "Sessions")):
        if not isinstance(s, Session):
            raise TypeError(
                f"sessions[{i}] must be a Session (its id meets the run's query ids), "
                f"got a {type(s).__name__}"
            )
        out[s.id] = s
    return out


def _document_texts(documents: Mapping[str, DocumentLike], ids: set[str]) -> dict[str, str]:
    """The prompt text of each document in `ids` (`passage_text`); an error names its id."""
    out = {}
    for d in sorted(ids):
        value = documents[d]
        if not isinstance(value, (str, Mapping)) and not isinstance(getattr(value, "text", 0), str):
            raise TypeError(
                f"documents[{d!r}] must be a text, a Passage or a {{title?, text}} mapping, "
                f"got a {type(value).__name__}"
            )
        try:
            out[d] = passage_text(value)
        except ValueError as e:  # a mapping without a string "text"
            raise ValueError(f"documents[{d!r}]: {e}") from None
    return out
