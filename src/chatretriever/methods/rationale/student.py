"""The saved Rabtriever student, loaded to score: `RabtrieverStudent` (a `rerank-distill` output,
made by `distill_recipe.run_distill`).

The frozen LLM reads documents and queries apart (one pass each, as the teacher's recipe loads
it: backbone, adapter, wording, budgets); the trained predictor scores every (query, document)
pair from the two states through the LLM's own LM head.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from chatretriever.errors import DataFormatError
from chatretriever.methods.rationale.distill import (
    PREDICTOR_CONFIG,
    PREDICTOR_WEIGHTS,
    Predictor,
    RabtrieverEncoder,
    load_predictor,
)
from chatretriever.methods.rationale.distill_recipe import DistillConfig, teacher_encoder
from chatretriever.methods.rationale.prompts import DocumentLike
from chatretriever.methods.rationale.scoring import relevance_scores
from chatretriever.modeling.recipe import SAVED_RECIPE, load_config
from chatretriever.types import SessionLike


class RabtrieverStudent:
    """The distilled bi-encoder: the frozen LLM reads documents and queries apart; the predictor
    scores every (query, document) pair from the two states.

    Args:
        encoder: The LLM's readings (as in training).
        predictor: The trained predictor.
        chunk: Predictor rows per call in `score` (bounds its memory to chunk x H floats).
    """

    def __init__(self, encoder: RabtrieverEncoder, predictor: Predictor, chunk: int = 8192) -> None:
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        self.encoder = encoder
        self.device = next(encoder.model.parameters()).device
        self.predictor = predictor.eval().to(self.device)
        self.chunk = chunk
        self.config: DistillConfig | None = None  # the recipe, when loaded by from_pretrained

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, device: str | None = None, batch_size: int | None = None
    ) -> RabtrieverStudent:
        """Load a `rerank-distill` output: its recipe's LLM (+ adapter) and the predictor.

        The recipe's `adapter` (the teacher) is a path or a built-in adapter name
        ("rahore-smol"). A relative path is looked up in the student's directory first, then
        in the current directory; an existing path wins over a built-in of the same name
        (`tuned_adapter.resolve_adapter`).

        Args:
            directory: The output dir, or a built-in student name ("rabtriever-smol"; an
                existing path of that name wins).
            device: Where to run (default: the accelerator, else the CPU).
            batch_size: Sequences per LLM forward (default: the recipe's).

        Raises:
            FileNotFoundError: A built-in student or teacher adapter this install does not ship.
            DataFormatError: Not a `rerank-distill` output, a bad predictor file (one that
                does not fit the LLM), or its recipe's adapter is bad.
            ValueError: A built-in name of another kind ("rahore-smol").
        """
        from chatretriever.methods.rationale.tuned_adapter import resolve_adapter
        from chatretriever.modeling.sources import builtin, resolve_model_dir

        info = builtin(directory)
        if info is not None and info.kind != "rabtriever":
            raise ValueError(f"'{info.name}' is a built-in {info.kind} model, not a student")
        directory = Path(directory) if info is None else resolve_model_dir(info.name)
        for name in (SAVED_RECIPE, PREDICTOR_WEIGHTS, PREDICTOR_CONFIG):
            if not (directory / name).is_file():
                raise DataFormatError(directory / name, "not found: not a rerank-distill output")
        recipe = directory / SAVED_RECIPE
        config = load_config(recipe, DistillConfig.from_dict)
        if batch_size is not None:
            config.batch_size = batch_size
        if config.adapter is not None:
            try:
                config.adapter = str(resolve_adapter(config.adapter, base=directory))
            except ValueError as e:
                raise DataFormatError(recipe, str(e), field="adapter") from e
        predictor = load_predictor(directory)  # a bad file is refused before the LLM loads
        encoder = teacher_encoder(config, device)
        hidden = encoder.model.get_input_embeddings().weight.shape[1]
        if predictor.config.hidden != hidden:
            raise DataFormatError(
                directory / PREDICTOR_CONFIG,
                f"the predictor is for hidden size {predictor.config.hidden}, the LLM "
                f"'{config.model}' has {hidden}",
            )
        student = cls(encoder, predictor)
        student.config = config
        return student

    def reading_key(self) -> tuple[Any, ...] | None:
        """What the LLM's readings depend on (backbone, resolved adapter, wording, budgets):
        students with equal keys have equal query and document states. None: unknown (not
        loaded from a recipe)."""
        if self.config is None:
            return None
        keys = ("model", "adapter", "wording", "max_document_tokens", "max_query_tokens")
        return tuple(getattr(self.config, k) for k in keys)

    def document_states(
        self, texts: Sequence[DocumentLike], show_progress: bool = False
    ) -> torch.Tensor:
        """(N, H) document states (once per corpus; the index); texts may be `Passage`s."""
        return self._rows(self.encoder.document_states(texts, show_progress))

    def query_states(
        self, sessions: Sequence[SessionLike], show_progress: bool = False
    ) -> torch.Tensor:
        """(Q, H) query states (one LLM pass per query, whatever the candidates)."""
        return self._rows(self.encoder.query_states(sessions, show_progress))

    def _rows(self, states: torch.Tensor) -> torch.Tensor:
        # no input, no forward: nothing gave the width, which `score` needs (0 rows of H)
        return states if states.numel() else states.new_empty(0, self.predictor.config.hidden)

    def _matrix(self, states: Any, name: str) -> torch.Tensor:
        """`states` (a tensor, numpy array or nested list) as a (rows, H) tensor."""
        hidden = self.predictor.config.hidden
        try:
            states = torch.as_tensor(states)
        except (TypeError, ValueError, RuntimeError) as e:
            raise TypeError(f"{name} must be a (rows, {hidden}) tensor or array: {e}") from None
        if states.numel() == 0:
            return states.new_empty(0, hidden)
        if states.dim() != 2 or states.shape[1] != hidden or not states.is_floating_point():
            raise ValueError(
                f"{name} must be (rows, {hidden}) float states (`document_states`, "
                f"`query_states`), got {states.dtype} of shape {tuple(states.shape)}"
            )
        return states

    @torch.inference_mode()
    def score(self, query_states: torch.Tensor, doc_states: torch.Tensor) -> torch.Tensor:
        """log P(yes) of every query against every document, `chunk` pairs per predictor call.

        Args:
            query_states: (Q, H), a tensor or a numpy array.
            doc_states: (N, H), likewise; none (N = 0) gives a (Q, 0) matrix.

        Returns:
            (Q, N) float32 scores on the CPU.

        Raises:
            TypeError: Not a tensor or array. ValueError: Not (rows, H) float states.
        """
        query_states = self._matrix(query_states, "query_states")
        doc_states = self._matrix(doc_states, "doc_states")
        n_q, n_d, hidden = query_states.shape[0], doc_states.shape[0], doc_states.shape[1]
        out = torch.empty(n_q, n_d)  # (Q, N)
        d_step = max(1, min(n_d, self.chunk))
        q_step = max(1, self.chunk // d_step)
        for qs in range(0, n_q, q_step):
            q = query_states[qs : qs + q_step].to(self.device)  # (q, H)
            for ds in range(0, n_d, d_step):
                d = doc_states[ds : ds + d_step].to(self.device)  # (d, H)
                pq = q[:, None].expand(-1, d.shape[0], -1).reshape(-1, hidden)  # (q*d, H)
                pd = d[None].expand(q.shape[0], -1, -1).reshape(-1, hidden)  # (q*d, H)
                logits = self.encoder.lm_head_options(self.predictor(pq, pd))  # (q*d, 2)
                block = relevance_scores(logits).view(q.shape[0], d.shape[0])  # (q, d)
                out[qs : qs + q.shape[0], ds : ds + d.shape[0]] = block.cpu()
        return out
