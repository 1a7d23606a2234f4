"""Incremental session encoding: a growing conversation re-uses the KV cache of its history.

A session is encoded as [rendered history and question, EMB x t] (`RetrievalTemplate.session_ids`)
and a causal decoder's keys and values at a position depend only on the tokens up to it. So for
a conversation that grows one turn at a time, the cache of the tokens rendered so far (the EMB
tokens left out) stays valid while the new rendering starts with exactly those tokens: only the
new turns' tokens and the EMB tokens are computed, and the EMB tokens' entries are cropped off
again so the cache holds the history alone.

Each call renders the whole session as `encode_sessions` does and compares ids; when the cached
ids are not a prefix of the new ones, it falls back to a full encode and logs why:
- "truncated": the session is over `max_session_len`, so old turns were dropped (or the question
  cut) and every position shifted;
- "history_changed": the messages do not extend the cached ones (an edited or removed turn, or a
  conversation id re-used for another conversation);
- "rendering_changed": the messages extend the cached ones but the chat template renders the
  earlier turns differently once later turns exist;
- "model_changed": the decoder `encode_sessions` runs is another one than the cache was made
  with (the fast path's inference copy is rebuilt when the weights, dtype or compile decision
  change).
The forward runs on the same decoder as `encode_sessions`: the retriever's inference copy
(`modeling.fast_encode`) when its fast path is on, else the training model under autocast (whose
weight changes are NOT detected: `clear()` after training it in place). Conversations live in an
LRU with a byte budget over their KV tensors.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import threading
import weakref
from collections import Counter, OrderedDict
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from chatretriever.modeling.fast_encode import resolved
from chatretriever.modeling.template import RetrievalTemplate
from chatretriever.types import SessionLike, Turn, as_messages, as_session

if TYPE_CHECKING:
    from chatretriever.methods.chatretriever.model import ChatRetriever

logger = logging.getLogger(__name__)

FALLBACK_REASONS = ("truncated", "history_changed", "rendering_changed", "model_changed")
_UNLIMITED = 1 << 30  # a session length no conversation reaches: "never truncate"


@dataclass
class _Entry:
    """One cached conversation: its messages, rendered ids (no EMB tokens) and their KV cache."""

    turns: tuple[Turn, ...]
    ids: list[int]
    cache: Any  # transformers DynamicCache over `ids`
    nbytes: int
    decoder: weakref.ref  # the decoder that computed the cache (no strong ref: no copy kept)


def cache_nbytes(cache: Any) -> int:
    """Bytes held by the key and value tensors of a transformers cache (all layers)."""
    total = 0
    for layer in getattr(cache, "layers", ()):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def common_prefix_len(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two id lists."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _cache_kwarg(decoder: torch.nn.Module) -> str:
    """The decoder's keyword for the KV cache: "cache" in recent transformers 5.x (which
    deprecates the old name), "past_key_values" before."""
    params = inspect.signature(decoder.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class IncrementalSessionEncoder:
    """Encodes growing conversations of a ChatRetriever, re-using each one's KV cache.

    `encode(conversation_id, messages)` returns what `retriever.encode_sessions([messages])[0]`
    returns (to float rounding); it is thread safe (one lock per instance: calls run one at a
    time).

    Args:
        retriever: The ChatRetriever (with its fast path off, `clear()` after changing its
            weights; with it on, a change is detected and falls back).
        max_bytes: Budget of the cached keys and values of all conversations; the least recently
            used conversations are evicted beyond it. 0 disables caching.

    Attributes:
        stats: Counters (a copy): hits, misses (unknown conversation), fallbacks and
            fallback_<reason> for each of FALLBACK_REASONS, evictions, tokens_computed,
            tokens_reused (history tokens read from the cache), conversations, bytes.
    """

    def __init__(self, retriever: ChatRetriever, max_bytes: int = 256 * 2**20) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.retriever = retriever
        self.max_bytes = int(max_bytes)
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._bytes = 0
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._unlimited: RetrievalTemplate | None = None  # built on the first fallback

    # ------------------------------------------------------------------ public
    @property
    def stats(self) -> dict[str, int]:
        with self._lock:
            out = {k: 0 for k in ("hits", "misses", "fallbacks", "evictions")}
            out.update({f"fallback_{r}": 0 for r in FALLBACK_REASONS})
            out.update({"tokens_computed": 0, "tokens_reused": 0})
            out.update(self._counts)
            out["conversations"] = len(self._entries)
            out["bytes"] = self._bytes
            return out

    def encode(self, conversation_id: str, messages: SessionLike) -> np.ndarray:
        """The embedding of a conversation's session so far, computing only its new tokens.

        Args:
            conversation_id: A non-empty key naming the conversation.
            messages: The whole session so far (a Session or {"role", "content"} messages ending
                with the current user question), as `encode_sessions` takes it.

        Returns:
            (D,) float32, equal to `retriever.encode_sessions([messages])[0]` up to rounding.
        """
        if not isinstance(conversation_id, str) or not conversation_id:
            raise ValueError(f"conversation_id must be a non-empty string, got {conversation_id!r}")
        if isinstance(messages, str):  # a question string: a one-turn session
            messages = as_messages(messages)
        turns = as_session(messages, conversation_id).turns
        ids = self.retriever.template.session_ids_batch([messages])[0]
        history = ids[: len(ids) - len(self.retriever.emb_ids)]  # what the cache will hold
        with self._lock:
            entry = self._entries.pop(conversation_id, None)
            if entry is not None:
                self._bytes -= entry.nbytes
            decoder, autocast = self._decoder(len(ids))
            if entry is not None and entry.decoder() is not decoder:  # new weights or dtype
                self._count_fallback(conversation_id, "model_changed", entry.ids, history)
                cache, reused = self._new_cache(), 0
            else:
                cache, reused = self._reusable(conversation_id, entry, turns, history, messages)
            emb = self._forward(decoder, autocast, ids, cache, reused)
            kept = _Entry(turns, history, cache, cache_nbytes(cache), weakref.ref(decoder))
            self._store(conversation_id, kept)
            self._counts["tokens_computed"] += len(ids) - reused
            self._counts["tokens_reused"] += reused
        return emb

    def reset(self, conversation_id: str) -> None:
        """Forget a conversation (nothing happens when it is not cached)."""
        with self._lock:
            entry = self._entries.pop(conversation_id, None)
            if entry is not None:
                self._bytes -= entry.nbytes

    def clear(self) -> None:
        """Forget every conversation (the counters are kept)."""
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def __contains__(self, conversation_id: object) -> bool:
        with self._lock:
            return conversation_id in self._entries

    # ------------------------------------------------------------------ cache decisions
    def _reusable(
        self,
        conversation_id: str,
        entry: _Entry | None,
        turns: tuple[Turn, ...],
        history: list[int],
        messages: SessionLike,
    ) -> tuple[Any, int]:
        """(cache to extend, number of its tokens) for a new rendering; an empty cache on a miss."""
        if entry is None:
            self._counts["misses"] += 1
            return self._new_cache(), 0
        n = len(entry.ids)
        if n <= len(history) and history[:n] == entry.ids:
            self._counts["hits"] += 1
            return entry.cache, n
        reason = self._fallback_reason(entry, turns, messages)
        self._count_fallback(conversation_id, reason, entry.ids, history)
        return self._new_cache(), 0

    def _count_fallback(
        self, conversation_id: str, reason: str, cached: list[int], history: list[int]
    ) -> None:
        self._counts["fallbacks"] += 1
        self._counts[f"fallback_{reason}"] += 1
        logger.info(
            "conversation %s: full re-encode (%s): %d cached tokens, %d new, the same up to "
            "token %d",
            conversation_id,
            reason,
            len(cached),
            len(history),
            common_prefix_len(cached, history),
        )

    def _fallback_reason(
        self, entry: _Entry, turns: tuple[Turn, ...], messages: SessionLike
    ) -> str:
        """Why cached ids are not a prefix of the new ones (one of FALLBACK_REASONS)."""
        if turns[: len(entry.turns)] != entry.turns:
            return "history_changed"
        template = self.retriever.template
        if self._unlimited is None:
            config = replace(self.retriever.config, max_session_len=_UNLIMITED)
            self._unlimited = RetrievalTemplate.from_config(template.tokenizer, config)
        full = len(self._unlimited.session_ids_batch([messages])[0])
        return "truncated" if full > template.max_session_len else "rendering_changed"

    def _store(self, conversation_id: str, entry: _Entry) -> None:
        """Insert as most recently used, then evict the least recently used beyond the budget."""
        if entry.nbytes > self.max_bytes:
            if self.max_bytes:
                logger.info(
                    "conversation %s: its cache (%d bytes) exceeds max_bytes=%d; not kept",
                    conversation_id,
                    entry.nbytes,
                    self.max_bytes,
                )
            return
        self._entries[conversation_id] = entry
        self._bytes += entry.nbytes
        while self._bytes > self.max_bytes:
            old_id, old = self._entries.popitem(last=False)
            self._bytes -= old.nbytes
            self._counts["evictions"] += 1
            logger.debug("evicted conversation %s (%d bytes)", old_id, old.nbytes)

    # ------------------------------------------------------------------ model
    @staticmethod
    def _new_cache() -> Any:
        from transformers import DynamicCache

        # No config: full-attention layers only, so a long history is never cut by a window.
        return DynamicCache()

    def _decoder(self, n_tokens: int) -> tuple[torch.nn.Module, bool]:
        """(decoder body, under autocast?) that `encode_sessions` runs now: the retriever's
        inference copy (`fast_encode`: LoRA merged, weights cast once) when its fast path is
        on, else the training model's body under bf16 autocast (fp32 layers hooked)."""
        r = self.retriever
        if resolved(r.encode_settings, r.device).enabled:
            return r.inference_body(n_tokens).decoder, False
        r._sync_fp32_layers()
        return r._base().get_decoder(), True

    def _forward(
        self, decoder: torch.nn.Module, autocast: bool, ids: list[int], cache: Any, reused: int
    ) -> np.ndarray:
        """Run ids[reused:] over a cache holding ids[:reused]; crop the EMB tokens off again.

        Returns:
            (D,) float32: the last EMB token's final hidden state (normalized if the retriever
            normalizes); `cache` (extended in place) then holds ids[: len(ids) - t].
        """
        r = self.retriever
        device = next(decoder.parameters()).device
        new = torch.tensor([ids[reused:]], dtype=torch.long, device=device)  # (1, N)
        positions = torch.arange(reused, len(ids), device=device).unsqueeze(0)  # (1, N)
        mask = torch.ones((1, len(ids)), dtype=torch.long, device=device)  # (1, past + N)
        was_training = r.training
        if autocast:
            r.eval()  # the training model: no dropout (the inference copy is always in eval)
        try:
            with torch.inference_mode(), r.autocast() if autocast else contextlib.nullcontext():
                out = decoder(
                    input_ids=new,
                    attention_mask=mask,
                    position_ids=positions,
                    use_cache=True,
                    **{_cache_kwarg(decoder): cache},  # the cache is extended in place
                )
        finally:
            r.train(was_training)
        cache.crop(-len(r.emb_ids))  # negative: remove the last t entries (the EMB tokens)
        emb = out.last_hidden_state[0, -1].float()  # (H,)
        if r.normalize:
            emb = F.normalize(emb, dim=-1)
        return emb.cpu().numpy()
