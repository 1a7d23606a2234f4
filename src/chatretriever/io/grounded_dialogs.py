"""Document-grounded dialogue sets: Doc2Dial / MultiDoc2Dial and Wizard of Wikipedia.

Doc2Dial and MultiDoc2Dial (IBM, `*_dial_{train,validation,test}.json`) are one JSON object
`{"dial_data": {domain: [dialogue, ...]}}` (Doc2Dial nests one more level, by document id);
a dialogue is `{"dial_id", "turns": [{"turn_id", "role": "user"|"agent", "utterance",
"references": [{"doc_id", "id_sp", ...}], "da"}]}` (Doc2Dial: the document is the dialogue's
`doc_id`, a reference `{"sp_id", "label"}`). One Session per user turn that an agent turn
answers, id `{dial_id}_{turn_id}` (the id MultiDoc2Dial's retrieval files give it); response = the
agent's utterance; metadata `doc_ids` (the documents the answer is grounded in), `spans`
(`doc_id#id_sp`), `domain`.

Their documents (`doc2dial_doc.json`, `multidoc2dial_doc.json`: `{"doc_data": {domain: {doc_id:
{"title", "doc_text", "spans": {id_sp: {"id_sec", "text_sec", "title", "start_sec", ...}}}}}}`)
are read as passages by `read_doc2dial_docs`: one per section (`id_sec`, as MultiDoc2Dial splits
them for retrieval) or one per document; ids are `passage_id(doc_id, id_sec)` (whitespace, which
the document ids hold and TREC files cannot, becomes `_`).

Wizard of Wikipedia (`{train,valid,test_random_split,test_topic_split}.json`) is a JSON list of
dialogues `{"chosen_topic", "dialog": [{"speaker": "0_Wizard"|"1_Apprentice"|..., "text",
"checked_sentence": {key: sentence}, "checked_passage": {key: title}}]}`. One Session per wizard
turn after an apprentice turn, id `{dialogue index}_{turn index}`; response = the wizard's text;
metadata `checked_sentence`, `checked_passage` (the knowledge the wizard chose; empty when none),
`topic`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from chatretriever.errors import DataFormatError
from chatretriever.io.files import check_id, read_json
from chatretriever.types import Passage, Session, Turn

_ROLES = {"user": "user", "agent": "assistant"}
_NO_KNOWLEDGE = "no_passages_used"  # what WoW records when the wizard used no knowledge
_SPACE = re.compile(r"\s+")
GRANULARITIES = ("section", "document")


def _doc2dial_dialogues(data: Any, path: Path) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """(where, dialogue) of MultiDoc2Dial's {domain: [...]}, Doc2Dial's {domain: {doc: [...]}}."""
    if not isinstance(data, Mapping) or not isinstance(data.get("dial_data"), Mapping):
        raise DataFormatError(path, 'expected an object {"dial_data": {domain: dialogues}}')
    for domain, group in data["dial_data"].items():
        lists = group.items() if isinstance(group, Mapping) else [("", group)]
        for doc, dialogues in lists:
            where = f"dial_data.{domain}" + (f".{doc}" if doc else "")
            if not isinstance(dialogues, list):
                raise DataFormatError(path, "expected a list of dialogues", None, where)
            for i, dialogue in enumerate(dialogues):
                if not isinstance(dialogue, Mapping) or not isinstance(dialogue.get("turns"), list):
                    msg = "expected a dialogue with a turns list"
                    raise DataFormatError(path, msg, None, f"{where}[{i}]")
                yield f"{where}[{i}]", {"domain": domain, "doc_id": doc or None, **dialogue}


def _doc2dial_turn(raw: Any, path: Path, where: str) -> tuple[str, str, Any]:
    ok = isinstance(raw, Mapping) and raw.get("role") in _ROLES
    if not ok or not isinstance(raw.get("utterance"), str):
        raise DataFormatError(path, "expected {role: user|agent, utterance, ...}", None, where)
    return _ROLES[raw["role"]], raw["utterance"], raw.get("turn_id")


def _references(turn: Mapping[str, Any], dialogue: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(document id, span id) of a turn's grounding: MultiDoc2Dial names the document in each
    reference (`doc_id`, `id_sp`); Doc2Dial in the dialogue (`doc_id`, `sp_id`)."""
    out = []
    for r in turn.get("references") or []:
        if not isinstance(r, Mapping):
            continue
        doc = r.get("doc_id") or dialogue.get("doc_id")
        span = r.get("id_sp") if r.get("id_sp") is not None else r.get("sp_id")
        if doc is not None and span is not None:
            out.append((str(doc), str(span)))
    return out


def read_doc2dial(path: str | Path) -> list[Session]:
    """Doc2Dial / MultiDoc2Dial dialogues as sessions (see the module doc); duplicates raise."""
    path = Path(path)
    out: dict[str, Session] = {}
    for where, dialogue in _doc2dial_dialogues(read_json(path), path):
        dial_id = check_id(str(dialogue.get("dial_id") or ""), path, None, f"{where}.dial_id")
        history: list[Turn] = []
        turns = dialogue["turns"]
        for j, raw in enumerate(turns):
            role, text, turn_id = _doc2dial_turn(raw, path, f"{where}.turns[{j}]")
            nxt = turns[j + 1] if j + 1 < len(turns) else None
            if role == "user" and isinstance(nxt, Mapping) and nxt.get("role") == "agent":
                refs = _references(nxt, dialogue)
                sid = f"{dial_id}_{turn_id}"
                if sid in out:
                    raise DataFormatError(
                        path, f"duplicate id {sid!r}", None, f"{where}.turns[{j}]"
                    )
                out[sid] = Session(
                    sid,
                    (*history, Turn("user", text)),
                    response=str(nxt.get("utterance") or "") or None,
                    metadata={
                        "conversation": dial_id,
                        "domain": dialogue["domain"],
                        "doc_ids": list(dict.fromkeys(doc for doc, _ in refs)),
                        "spans": [f"{doc}#{span}" for doc, span in refs],
                    },
                )
            history.append(Turn(role, text))
    return list(out.values())


def _wow_turn(raw: Any, path: Path, where: str) -> tuple[str, str]:
    speaker = raw.get("speaker") if isinstance(raw, Mapping) else None
    if not isinstance(speaker, str) or not speaker.endswith(("Wizard", "Apprentice")):
        raise DataFormatError(
            path, "expected a speaker ending in Wizard or Apprentice", None, where
        )
    if not isinstance(raw.get("text"), str):
        raise DataFormatError(path, "expected a text", None, f"{where}.text")
    return ("assistant" if speaker.endswith("Wizard") else "user"), raw["text"]


def _chosen(raw: Mapping[str, Any], key: str) -> list[str]:
    """The values of a WoW `checked_*` map, without the 'no passage used' marker."""
    values = (raw.get(key) or {}).values() if isinstance(raw.get(key), Mapping) else []
    return [str(v) for v in values if v and str(v) != _NO_KNOWLEDGE]


def read_wow(path: str | Path) -> list[Session]:
    """Wizard of Wikipedia dialogues as sessions (see the module doc)."""
    path = Path(path)
    data = read_json(path)
    if not isinstance(data, list):
        raise DataFormatError(path, "expected a JSON list of dialogues")
    out = []
    for i, dialogue in enumerate(data):
        if not isinstance(dialogue, Mapping) or not isinstance(dialogue.get("dialog"), list):
            raise DataFormatError(path, "expected a dialogue with a dialog list", None, f"[{i}]")
        history: list[Turn] = []
        for j, raw in enumerate(dialogue["dialog"]):
            role, text = _wow_turn(raw, path, f"[{i}].dialog[{j}]")
            if role == "assistant" and history and history[-1].role == "user":
                meta = {
                    "conversation": str(i),
                    "topic": dialogue.get("chosen_topic"),
                    "checked_sentence": _chosen(raw, "checked_sentence"),
                    "checked_passage": _chosen(raw, "checked_passage"),
                }
                out.append(Session(f"{i}_{j}", tuple(history), response=text, metadata=meta))
            history.append(Turn(role, text))
    return out


def passage_id(doc_id: str, section: str | None = None) -> str:
    """A Doc2Dial passage id: the document id (whitespace as `_`), `#section` for a section."""
    base = _SPACE.sub("_", doc_id.strip())
    return base if section is None else f"{base}#{section}"


def _doc_sections(doc: Mapping[str, Any], path: Path, where: str) -> dict[str, dict[str, Any]]:
    """id_sec -> {text, title, start} of a document's spans (each span names its section)."""
    spans = doc.get("spans")
    if not isinstance(spans, Mapping):
        raise DataFormatError(path, "expected an object of spans", None, f"{where}.spans")
    out: dict[str, dict[str, Any]] = {}
    for sp_id, span in spans.items():
        at = f"{where}.spans.{sp_id}"
        sec = span.get("id_sec") if isinstance(span, Mapping) else None
        if not isinstance(sec, (str, int)) or not isinstance(span.get("text_sec"), str):
            raise DataFormatError(path, "expected id_sec and text_sec", None, at)
        start = span.get("start_sec", 0)
        entry = {"text": span["text_sec"], "title": span.get("title"), "start": start, "spans": []}
        out.setdefault(str(sec), entry)["spans"].append(str(sp_id))
    return out


def read_doc2dial_docs(path: str | Path, granularity: str = "section") -> list[Passage]:
    """The documents of a Doc2Dial / MultiDoc2Dial `*_doc.json` as passages (module doc).

    Args:
        path: The documents file.
        granularity: "section": a passage per section, titled by its document (metadata
            `section`, `spans`: the span ids it holds); "document": a passage per document.

    Returns:
        Passages in the file's order (sections by their position); metadata `domain`,
        `doc_id` (as published).
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {', '.join(GRANULARITIES)}")
    path = Path(path)
    data = read_json(path)
    if not isinstance(data, Mapping) or not isinstance(data.get("doc_data"), Mapping):
        raise DataFormatError(path, 'expected an object {"doc_data": {domain: {doc_id: doc}}}')
    out: dict[str, Passage] = {}
    for domain, docs in data["doc_data"].items():
        if not isinstance(docs, Mapping):
            raise DataFormatError(path, "expected an object of documents", None, domain)
        for doc_id, doc in docs.items():
            where = f"doc_data.{domain}.{doc_id}"
            if not isinstance(doc, Mapping) or not isinstance(doc.get("doc_text"), str):
                raise DataFormatError(path, "expected a document with doc_text", None, where)
            title = str(doc.get("title") or doc_id)
            meta = {"domain": domain, "doc_id": doc_id}
            if granularity == "document":
                parts = {
                    passage_id(doc_id): Passage(passage_id(doc_id), doc["doc_text"], title, meta)
                }
            else:
                sections = _doc_sections(doc, path, where)
                parts = {
                    passage_id(doc_id, sec): Passage(
                        passage_id(doc_id, sec),
                        " ".join(v["text"].split()),
                        title,
                        {**meta, "section": v["title"], "spans": v["spans"]},
                    )
                    for sec, v in sorted(sections.items(), key=lambda kv: _start(kv[1]))
                }
            for pid, passage in parts.items():
                if pid in out:
                    raise DataFormatError(path, f"two passages share the id {pid!r}", None, where)
                out[pid] = passage
    return list(out.values())


def _start(section: Mapping[str, Any]) -> float:
    start = section.get("start")
    return float(start) if isinstance(start, (int, float)) and not isinstance(start, bool) else 0.0
