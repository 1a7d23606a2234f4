"""The inference side of an `emb_llm.EmbLLM`: encoding sessions and passages (through the fast
path of `fast_encode`, or the training forward when it is off) and the bodies it runs, made again
when the weights, the dtype, the compile decision or the runtime change.

`EmbEncoding` is a mixin of `EmbLLM` (it reads the model's template, weights, settings and
precision from it); its public methods are `EmbLLM`'s.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from chatretriever.modeling.collate import encode_batch
from chatretriever.modeling.fast_encode import (
    EncodeBody,
    InferenceBody,
    encode_ids,
    resolved,
    runtime_info,
    want_compile,
)
from chatretriever.types import Passage, SessionLike, as_sessions, passage_texts


class EmbEncoding:
    """Encoding for `EmbLLM` (a mixin: the attributes it reads are `EmbLLM`'s)."""

    def encode_sessions(
        self, sessions: Sequence[SessionLike], batch_size: int = 16, show_progress: bool = False
    ) -> np.ndarray:
        """(B, D) float32 embeddings of sessions (Session objects or message lists); a current
        turn over `max_session_len` keeps its end (the question), older turns are dropped first.

        Raises:
            TypeError: `sessions` is one session, a string, or holds something not a session.
        """
        seqs = self.template.session_ids_batch(as_sessions(sessions))  # few tokenizer calls
        return self._encode_ids(seqs, batch_size, show_progress, "sessions")

    def encode_passages(
        self,
        passages: Sequence[Passage | Mapping[str, Any] | str],
        batch_size: int = 16,
        show_progress: bool = False,
    ) -> np.ndarray:
        """(B, D) float32 embeddings of passages (each one assistant message): `Passage`s,
        {title?, text} mappings or strings, in a list (a bare string is refused).

        Raises:
            TypeError: `passages` is one passage (a string, a mapping) or holds something else.
        """
        texts = passage_texts(passages)  # a bare string is refused, not read char by char
        seqs = self.template.passage_ids_batch(texts)  # one tokenizer call, not one each
        return self._encode_ids(seqs, batch_size, show_progress, "passages")

    def _encode_ids(
        self, seqs: list[list[int]], batch_size: int, show_progress: bool, desc: str
    ) -> np.ndarray:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer of at least 1, got {batch_size!r}")
        settings = resolved(self.encode_settings, self.device)
        bar = tqdm(
            total=len(seqs), desc=f"encoding {desc}", unit=desc[:-1], disable=not show_progress
        )
        with torch.inference_mode(), bar:
            if settings.enabled and seqs:
                body = self.encode_body(sum(len(s) for s in seqs))
                hidden = encode_ids(
                    body, seqs, self.pad_id, self.emb_ids[-1], settings, batch_size, bar
                )
                return self._finish(hidden).cpu().numpy()
            return self._encode_plain(seqs, batch_size, bar)

    def _encode_plain(self, seqs: list[list[int]], batch_size: int, bar: Any) -> np.ndarray:
        """The training forward in eval mode, `batch_size` length-sorted texts per batch."""
        out = np.zeros((len(seqs), self.dim), dtype=np.float32)
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))  # longest first: less padding
        was_training = self.training
        self.eval()
        try:
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                batch = encode_batch([seqs[i] for i in idx], self.pad_id, self.padding_side)
                out[idx] = self.embed(batch).cpu().numpy()
                bar.update(len(idx))
        finally:
            self.train(was_training)
        return out

    def inference_body(self, new_tokens: int = 0) -> InferenceBody:
        """The inference copy of the current weights (`fast_encode.InferenceBody`), made again
        when the weights, the dtype or the compile decision changed.

        Always torch, whatever `encode_settings.runtime` says: it is the body incremental
        session encoding runs with KV caches (`encode_body` picks the runtime of whole texts).

        Args:
            new_tokens: Tokens about to be encoded (counted for compile="auto").
        """
        settings = resolved(self.encode_settings, self.device)
        self._tokens_encoded += new_tokens
        dtype = self.compute_dtype
        fp32_layers = self.config.fp32_layers if dtype == torch.bfloat16 else 0
        compile_now = want_compile(settings, self.device, self._tokens_encoded)
        if self._inference is not None and self._inference[1].compiled and not compile_now:
            compile_now = settings.compile != "off"  # once compiled, stay compiled
        key = (self._weights_state()[1], dtype, fp32_layers, compile_now, str(self.device))
        if self._inference is None or self._inference[0] != key:
            body = InferenceBody(self.model, dtype, fp32_layers, compile=compile_now)
            self._inference = (key, body)
        return self._inference[1]

    def encode_body(self, new_tokens: int = 0) -> EncodeBody:
        """The body `encode_sessions` and `encode_passages` run: the torch inference copy
        (`inference_body`), or under `encode_settings.runtime` "openvino" the merged body
        converted and compiled by OpenVINO (`ov_runtime.openvino_body`, precision hint from the
        compute dtype), made again when the weights, the dtype or the device changed.

        Incremental session encoding needs KV caches: it runs `inference_body` (torch) whatever
        the runtime.

        Args:
            new_tokens: Tokens about to be encoded (counted for compile="auto").

        Raises:
            ValueError: Runtime "openvino" with the model on a GPU (a CPU runtime here).
            MissingExtraError: Runtime "openvino" without openvino installed.
        """
        settings = resolved(self.encode_settings, self.device)
        if settings.runtime == "torch":
            return self.inference_body(new_tokens)
        from chatretriever.modeling.ov_runtime import check_device, openvino_body

        check_device(self.device)
        dtype = self.compute_dtype
        key = (self._weights_state()[1], dtype, str(self.device), settings.runtime)
        if self._runtime_body is None or self._runtime_body[0] != key:
            self._runtime_body = None  # the old compiled body goes before a new one is built
            self._runtime_body = (key, openvino_body(self.model, self.pad_id, dtype))
        return self._runtime_body[1]

    def runtime_info(self) -> dict[str, Any]:
        """What the fast path runs on (hardware kind, settings, runtime, dtype, compiled), for
        metadata."""
        settings = resolved(self.encode_settings, self.device)
        cached = self._inference if settings.runtime == "torch" else self._runtime_body
        body = cached[1] if cached else None
        return runtime_info(settings, body, self.device)
