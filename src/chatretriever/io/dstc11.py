"""DSTC11 Track 5 (alexa/dstc11-track5): subjective-knowledge grounded dialogue.

`{split}/logs.json` is a list of dialogue contexts (`[{"speaker": "U"|"S", "text"}]`, the last
is the user turn); `{split}/labels.json` the labels in the same order: `{"target": bool,
"knowledge": [{"domain", "entity_id", "doc_type": "review"|"faq", "doc_id", "sent_id"?}],
"response"}`. `knowledge.json` holds the snippets: per domain and entity its `name`,
`reviews[doc_id].sentences[sent_id]` and `faqs[doc_id]` (`question`, `answer`).

A snippet's id is `{domain}:{entity_id}:review:{doc_id}:{sent_id}` or
`{domain}:{entity_id}:faq:{doc_id}`; its title is the entity's name. Torch-free.

DSTC9 track 1 and DSTC10 track 2 (the format track 5 grew from) are read too: their knowledge
entities hold `docs[doc_id]` (`title`, `body`), read as FAQs; entity `"*"` is domain-wide
knowledge without a name (titled by its domain); their labels' references have no `doc_type`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chatretriever.errors import DataFormatError
from chatretriever.io.files import read_json
from chatretriever.types import Passage, Session, Turn

_ROLES = {"U": "user", "S": "assistant"}


@dataclass
class Dstc11Data:
    """The dialogue contexts as Sessions and the knowledge snippets by id."""

    sessions: list[Session]
    snippets: dict[str, Passage]


def snippet_id(ref: Mapping[str, Any]) -> str:
    """The id of a knowledge reference (a label's `knowledge` item)."""
    kind = ref.get("doc_type", "faq")  # DSTC9/10 references name FAQ-like docs only
    base = f"{ref['domain']}:{ref['entity_id']}:{kind}:{ref['doc_id']}"
    return base if kind == "faq" else f"{base}:{ref['sent_id']}"


def _faq_docs(entity: Mapping[str, Any], path: Path, where: str) -> dict[str, str]:
    """An entity's FAQs as doc id -> text: DSTC11 `faqs` (question, answer), DSTC9/10 `docs`
    (title, body)."""
    out: dict[str, str] = {}
    for group, (first, second) in (("faqs", ("question", "answer")), ("docs", ("title", "body"))):
        for doc_id, doc in (entity.get(group) or {}).items():
            ok = isinstance(doc, Mapping) and all(
                isinstance(doc.get(k), str) for k in (first, second)
            )
            if not ok:
                msg = f"expected {first} and {second} strings"
                raise DataFormatError(path, msg, None, f"{where}.{group}.{doc_id}")
            out[str(doc_id)] = f"{doc[first]} {doc[second]}"
    return out


def read_knowledge(path: str | Path) -> dict[str, Passage]:
    """Every review sentence and FAQ of `knowledge.json` as a Passage (see the module doc)."""
    data = read_json(path)
    if not isinstance(data, Mapping):
        raise DataFormatError(path, "expected an object of domains")
    out: dict[str, Passage] = {}
    for domain, entities in data.items():
        if not isinstance(entities, Mapping):
            raise DataFormatError(path, "expected an object of entities", None, domain)
        for eid, entity in entities.items():
            where = f"{domain}.{eid}"
            name = entity.get("name") if isinstance(entity, Mapping) else None
            if eid == "*" and isinstance(entity, Mapping) and name is None:
                name = domain  # DSTC9/10 domain-wide knowledge has no name
            if not isinstance(name, str):
                raise DataFormatError(path, "expected an entity with a name", None, where)
            meta = {"domain": domain, "entity_id": eid}
            ref = {"domain": domain, "entity_id": eid}
            for doc_id, review in (entity.get("reviews") or {}).items():
                for sent_id, text in (review.get("sentences") or {}).items():
                    rid = {**ref, "doc_type": "review", "doc_id": doc_id, "sent_id": sent_id}
                    out[snippet_id(rid)] = Passage(snippet_id(rid), str(text), name, meta)
            for doc_id, text in _faq_docs(entity, path, where).items():
                pid = snippet_id({**ref, "doc_type": "faq", "doc_id": doc_id})
                out[pid] = Passage(pid, text, name, meta)
    return out


def _turns(log: Any, path: Path, i: int) -> tuple[Turn, ...]:
    if not isinstance(log, list) or not log:
        raise DataFormatError(path, "expected a non-empty list of turns", None, f"[{i}]")
    turns = []
    for j, t in enumerate(log):
        ok = (
            isinstance(t, Mapping) and t.get("speaker") in _ROLES and isinstance(t.get("text"), str)
        )
        if not ok:
            raise DataFormatError(path, "expected {speaker: U|S, text}", None, f"[{i}][{j}]")
        turns.append(Turn(_ROLES[t["speaker"]], t["text"]))
    if turns[-1].role != "user":
        raise DataFormatError(path, "the last turn must be the user's", None, f"[{i}]")
    return tuple(turns)


def _label(raw: Any, path: Path, i: int) -> tuple[list[str], str | None, bool]:
    if not isinstance(raw, Mapping) or not isinstance(raw.get("target"), bool):
        raise DataFormatError(path, "expected an object with a boolean target", None, f"[{i}]")
    try:
        ids = [snippet_id(k) for k in raw.get("knowledge") or []]
    except (KeyError, TypeError) as e:
        raise DataFormatError(
            path, f"bad knowledge reference ({e})", None, f"[{i}].knowledge"
        ) from None
    response = raw.get("response")
    if response is not None and not isinstance(response, str):
        raise DataFormatError(path, "expected a string", None, f"[{i}].response")
    return ids, response, raw["target"]


def read_dialogues(
    logs_path: str | Path, labels_path: str | Path | None, split: str
) -> list[Session]:
    """The contexts of `logs.json` (with their `labels.json`, if given) as Sessions.

    Ids are `{split}-{i}`. Metadata: `conversation` (a hash of the dialogue's first turn:
    contexts cut from one dialogue share it, so a hold-out never splits a dialogue) and, with
    labels, `snippet_ids` (the grounding knowledge) and `target` (knowledge-seeking or not);
    `response` is the label's gold response.
    """
    logs_path = Path(logs_path)
    logs = read_json(logs_path)
    if not isinstance(logs, list):
        raise DataFormatError(logs_path, "expected a JSON list of dialogue contexts")
    labels: list[Any] | None = None
    if labels_path is not None:
        labels_path = Path(labels_path)
        labels = read_json(labels_path)
        if not isinstance(labels, list) or len(labels) != len(logs):
            raise DataFormatError(labels_path, f"expected one label per context of {logs_path}")
    out = []
    for i, log in enumerate(logs):
        turns = _turns(log, logs_path, i)
        first = hashlib.sha1(turns[0].content.encode("utf-8")).hexdigest()[:12]
        meta: dict[str, Any] = {}
        response = None
        if labels is not None and labels_path is not None:
            ids, response, target = _label(labels[i], labels_path, i)
            meta.update(snippet_ids=ids, target=target)
        meta["conversation"] = f"dstc11-{first}"
        out.append(Session(f"{split}-{i}", turns, response=response, metadata=meta))
    return out


def read_logs(logs_path: str | Path) -> list[Session]:
    """A `logs.json` as published: with the `labels.json` beside it when there is one, ids
    `{its directory}-{i}` (`read_dialogues`)."""
    logs_path = Path(logs_path)
    labels = logs_path.with_name("labels.json")
    split = logs_path.resolve().parent.name or "logs"
    return read_dialogues(logs_path, labels if labels.is_file() else None, split)


def load_dstc11(directory: str | Path, split: str = "val") -> Dstc11Data:
    """Sessions of a split and the knowledge snippets of a `dstc11-track5/` directory."""
    directory = Path(directory)
    sessions = read_dialogues(
        directory / split / "logs.json", directory / split / "labels.json", split
    )
    return Dstc11Data(sessions, read_knowledge(directory / "knowledge.json"))
