"""The reranker's training pairs: (document, conversation, fits?) as data and as model inputs.

A pairs file holds JSON lines `{"document", "session": {sessions JSONL object}, "relevant"}`:
for each training query its gold document and `n_negatives` others (`choice_pairs`,
`write_pairs`, `iter_pairs`). Supervised tuning feeds them through `ChoiceCollator` (the token
ids the reranker scores and the right option's id); DPO through `dpo_rows` (TRL's preference
rows as ids).
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from chatretriever.errors import DataFormatError
from chatretriever.io.files import iter_jsonl, write_jsonl
from chatretriever.io.sessions import session_from_dict, session_to_dict
from chatretriever.methods.rationale.prompts import BinaryChoicePrompt
from chatretriever.types import Passage, Session, passage_text


@dataclass(frozen=True)
class ChoicePair:
    """One (document, conversation) pair and whether the document fits."""

    document: str
    session: Session
    relevant: bool


def choice_pairs(
    sessions: Sequence[Session],
    passages: Sequence[Passage],
    gold: Mapping[str, str],
    n_negatives: int = 1,
    seed: int = 0,
) -> list[ChoicePair]:
    """For each session: its gold passage (relevant) and `n_negatives` others drawn at random.

    Args:
        sessions: Training queries.
        passages: The candidates (e.g. the 8 strategies).
        gold: Session id -> gold passage id.
        n_negatives: Negatives per session (at most len(passages) - 1).
        seed: Sampling seed.
    """
    by_id = {p.id: p for p in passages}
    rng = random.Random(seed)
    out = []
    for s in sessions:
        if gold[s.id] not in by_id:
            raise ValueError(f"session {s.id}: gold {gold[s.id]!r} is not a passage")
        others = [p for p in passages if p.id != gold[s.id]]
        out.append(ChoicePair(passage_text(by_id[gold[s.id]]), s, True))
        for p in rng.sample(others, min(n_negatives, len(others))):
            out.append(ChoicePair(passage_text(p), s, False))
    return out


def write_pairs(path: str | Path, pairs: Sequence[ChoicePair]) -> int:
    """Write pairs as JSON lines."""
    rows = (
        {"document": p.document, "session": session_to_dict(p.session), "relevant": p.relevant}
        for p in pairs
    )
    return write_jsonl(path, rows)


def iter_pairs(path: str | Path) -> Iterator[ChoicePair]:
    """Read pairs JSONL (errors name the line and field)."""
    for line, obj in iter_jsonl(path):
        if not isinstance(obj.get("document"), str):
            raise DataFormatError(path, "expected a string", line, "document")
        if not isinstance(obj.get("relevant"), bool):
            raise DataFormatError(path, "expected true or false", line, "relevant")
        if not isinstance(obj.get("session"), Mapping):
            raise DataFormatError(path, "expected a session object", line, "session")
        yield ChoicePair(
            obj["document"], session_from_dict(obj["session"], path, line), obj["relevant"]
        )


def dpo_rows(prompt: BinaryChoicePrompt, pairs: Sequence[ChoicePair]) -> list[dict[str, list[int]]]:
    """TRL preference rows as token ids: `prompt_ids` = the very ids the reranker scores
    (document prefix + query suffix, up to the answer position); `chosen_ids` = the right
    option, `rejected_ids` = the other, each followed by the eos token (as TRL's text path and
    the released LLaMA-Factory scripts append it).

    Ids, not text: decoded text tokenized again is not the same ids (tokens merge across the
    document's boundary; a typed "<|im_end|>" would become the special token).
    """
    docs = prompt.document_ids([p.document for p in pairs])
    queries = prompt.query_ids([p.session for p in pairs])
    eos = [] if prompt.tokenizer.eos_token_id is None else [int(prompt.tokenizer.eos_token_id)]
    yes, no = prompt.option_ids
    return [
        {
            "prompt_ids": d + q,
            "chosen_ids": [yes if p.relevant else no, *eos],
            "rejected_ids": [no if p.relevant else yes, *eos],
        }
        for d, q, p in zip(docs, queries, pairs, strict=True)
    ]


class ChoiceCollator:
    """Pairs -> {"sequences": token id lists, "targets": (B,) option ids} (model-free)."""

    def __init__(self, prompt: BinaryChoicePrompt) -> None:
        self.prompt = prompt

    def __call__(self, pairs: Sequence[ChoicePair]) -> dict[str, Any]:
        docs = self.prompt.document_ids([p.document for p in pairs])
        queries = self.prompt.query_ids([p.session for p in pairs])
        targets = self.prompt.answer_ids([p.relevant for p in pairs])
        return {
            "sequences": [d + q for d, q in zip(docs, queries, strict=True)],
            "targets": torch.tensor(targets, dtype=torch.long),
        }
