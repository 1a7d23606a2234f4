"""The workspace of benchmarks/rag.py: the shared benchmark workspace over the searched passages,
plus the models that answer (loaded once each) and what identifies them in the answer cache."""

from __future__ import annotations

import argparse
import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from _conversational import runs

from _rag.systems import RagSystem
from chatretriever.types import Passage, Session


class RagWorkspace(runs.Workspace):
    """The shared benchmark workspace (encoders, embeddings, BM25) over the searched passages,
    plus the answering models."""

    def __init__(
        self,
        args: argparse.Namespace,
        turns: list[Session],
        passages: list[Passage],
        judged: Mapping[str, Mapping[str, int]],
        corpus_path: Path,
    ) -> None:
        super().__init__(args, turns, corpus_path)
        self.passages = passages
        self.judged = judged
        self._generators: dict[str, Any] = {}

    def corpus(self) -> list[Passage]:
        return self.passages

    def answering_model(self, system: RagSystem) -> Any:
        """The model that answers for `system` (loaded once per model)."""
        from chatretriever.modeling.grounded import GroundedGenerator

        if system.answerer == "self":
            return self.encoder(system.retriever)
        key = f"{system.answerer}:{system.generator or system.retriever}"
        if key not in self._generators:
            a = self.args
            settings = {"max_new_tokens": a.max_new_tokens, "batch_size": a.gen_batch_size}
            if system.answerer == "llm":
                dtype = self.gen_dtype()
                gen = GroundedGenerator.from_pretrained(
                    system.generator,
                    a.device,
                    dtype=None if dtype == "float32" else dtype,
                    **settings,
                )
            else:  # the retriever's causal LM, LoRA merged into a copy
                retriever = self.encoder(system.retriever)
                model = copy.deepcopy(retriever.model)
                model = model.merge_and_unload() if hasattr(model, "peft_config") else model
                gen = GroundedGenerator(model, retriever.tokenizer, **settings)
            self._generators[key] = gen
        return self._generators[key]

    def gen_dtype(self) -> str:
        """`--gen-dtype` resolved ("auto" -> bf16 or float32 on this device)."""
        from chatretriever.modeling.precision import dtype_name

        return dtype_name(self.args.gen_dtype, self.args.device)

    def answerer_key(self, system: RagSystem) -> dict[str, Any]:
        """What identifies the answering model (cache key of its answers; the dtype is in it
        when it is not float32, so float32 answers cached before the option stay valid)."""
        if system.answerer == "llm":
            key = {"llm": system.generator, "files": runs.files_state(system.generator)}
            dtype = self.gen_dtype()
            return key if dtype == "float32" else {**key, "dtype": dtype}
        return {system.answerer: self.fingerprint(system.retriever)}
