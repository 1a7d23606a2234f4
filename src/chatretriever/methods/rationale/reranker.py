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

from chatretriever.methods.rationale.prompts import BinaryChoicePrompt
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
from chatretriever.types import Run, Session, SessionLike

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
            wording: "ab" or "tf" (`prompts.WORDINGS`).
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
            ValueError: A bad adapter (`resolve_adapter`, `check_adapter_recipe`,
                `check_adapter_weights`, `load_checked_adapter`).
        """
        from chatretriever.modeling.backbones import checked_device, load_backbone

        target = checked_device(device)  # before the backbone loads
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

    def score_pairs(self, documents: Sequence[str], sessions: Sequence[SessionLike]) -> np.ndarray:
        """Scores of aligned pairs, whole prompts per batch (no KV reuse). A session is a
        `Session` or a list of {role, content} messages.

        Returns:
            (N,) float32 log P(yes).
        """
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

    def score_document(self, document: str, sessions: Sequence[SessionLike]) -> np.ndarray:
        """Scores of one document against many sessions; its KV cache is computed once.

        Returns:
            (Q,) float32 log P(yes).
        """
        kv = prefix_kv(self.model, self.prompt.document_ids([document])[0])
        suffixes = self.prompt.query_ids(sessions)
        out = np.zeros(len(sessions), dtype=np.float32)
        for start in range(0, len(sessions), self.batch_size):
            batch = suffixes[start : start + self.batch_size]
            logits = cached_option_logits(
                self.model, [kv] * len(batch), batch, self.prompt.option_ids, self.pad_id
            )
            out[start : start + len(batch)] = relevance_scores(logits).cpu().numpy()
        return out

    def score_matrix(
        self,
        documents: Sequence[str],
        sessions: Sequence[SessionLike],
        reuse_kv: bool = True,
        show_progress: bool = False,
    ) -> np.ndarray:
        """Every document against every session (e.g. the 8 strategies).

        Returns:
            (Q, D) float32 log P(yes).
        """
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
        documents: Mapping[str, str],
        sessions: Sequence[Session],
        k: int = 20,
        reuse_kv: bool = True,
        show_progress: bool = False,
    ) -> Run:
        """Rerank the top-k of each query of a first-stage run.

        Args:
            run: The first-stage run.
            documents: Doc id -> the text the prompt shows (e.g. `passage_text`).
            sessions: The queries; run queries without a session raise.
            k: How many of each query's top documents are reranked (and kept).
            reuse_kv: Group pairs by document and reuse the KV cache of each document that
                several queries retrieved (a document of one query is scored in the batches
                of whole prompts: its cache would serve nothing).
            show_progress: A progress bar over documents (reuse) or batches.

        Returns:
            A Run of the top-k of each query, scored by log P(yes), named "<run>.rahore".

        Raises:
            ValueError: k < 1, a run query without a session, a run document not in
                `documents`.
        """
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        by_id = {s.id: s for s in sessions}
        missing = sorted(q for q in run.scores if q not in by_id)
        if missing:
            raise ValueError(f"the run has {len(missing)} queries with no session: {missing[:5]}")
        pairs = [(q, d.doc_id) for q in sorted(run.scores) for d in run.ranked(q)[:k]]
        unknown = sorted({d for _, d in pairs if d not in documents})
        if unknown:
            raise ValueError(f"{len(unknown)} run documents are not in the corpus: {unknown[:5]}")
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
                values = self.score_document(documents[d], [by_id[q] for q in qs])
                for q, v in zip(qs, values, strict=True):
                    scores[q][d] = float(v)
        if whole:
            values = self.score_pairs(
                [documents[d] for _, d in whole], [by_id[q] for q, _ in whole]
            )
            for (q, d), v in zip(whole, values, strict=True):
                scores[q][d] = float(v)
        logger.info("reranked %d pairs of %d queries", len(pairs), len(run.scores))
        return Run(scores, f"{run.name}.rahore")
