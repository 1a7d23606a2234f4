"""TREC CAsT 2019-2022 topic files and graded qrels.

Each year's topic file is a JSON list of topics `{"number", "turn": [...]}`; turn fields differ:

- 2019: `raw_utterance` only; the manual rewrites of the evaluation topics are a separate TSV
  (`evaluation_topics_annotated_resolved_v1.0.tsv`: `{topic}_{turn}<TAB>rewrite`). The same
  topics also ship as plain text (`evaluation_topics_v1.0.txt`, `chatretriever.io.cast_txt`).
- 2020: `manual_rewritten_utterance`, `automatic_rewritten_utterance`, canonical result ids
  (no response texts); the automatic file adds `automatic_canonical_result_id`.
- 2021: as 2020 plus `passage`, the canonical response text shown to the user.
- 2022 (flattened, duplicated): `utterance`, `manual_rewritten_utterance`, `response`,
  `provenance`; turn numbers are strings like `"2-3"` and each branch of a topic tree is listed
  as a separate topic, so shared turns repeat (they are kept once).
- 2022 (tree): each turn is one message, `participant` "User" (`utterance`, rewrites) or
  "System" (`response`, `provenance`), linked to the turn it continues by `parent`.

One Session per user turn, id `{topic}_{turn}` (the qrels ids). History: the earlier utterances
and, where the year has them, the canonical responses as assistant turns (in a tree, the chain of
`parent`s). Topics without manual rewrites (2019) take them from a `*resolved*.tsv` beside them.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chatretriever.errors import DataFormatError
from chatretriever.io.files import iter_lines, read_json
from chatretriever.io.trec import read_trec_qrels
from chatretriever.types import Qrel, Session, Turn

logger = logging.getLogger(__name__)

YEARS = (2019, 2020, 2021, 2022)
SPLITS = ("eval", "train")
_UTTERANCE = ("raw_utterance", "utterance")
_RESPONSE = ("passage", "response")
_PARTICIPANTS = {"user": "user", "system": "assistant"}  # 2022 tree
_RENAMED = {"automatic_rewritten_utterance": "automatic_rewrite"}
_TSV_ENDS = (".tsv", ".tsv.gz")
_TEXT_KEYS = {"number", "manual_rewritten_utterance", *_UTTERANCE, *_RESPONSE}


@dataclass(frozen=True)
class CastData:
    """One CAsT year: sessions (one per turn) and graded qrels (ids name sessions)."""

    year: int
    sessions: list[Session]
    qrels: list[Qrel]


@dataclass(frozen=True)
class _YearFiles:
    topics: str
    qrels: str
    rewrites: str | None = None  # 2019: manual rewrites in a TSV
    automatic: str | None = None  # 2020/2021: the automatic-run topic file


_FILES = {
    (2019, "eval"): _YearFiles(
        "evaluation_topics_v1.0.json",
        "2019qrels.txt",
        rewrites="evaluation_topics_annotated_resolved_v1.0.tsv",
    ),
    (2019, "train"): _YearFiles("train_topics_v1.0.json", "train_topics_mod.qrel"),
    (2020, "eval"): _YearFiles(
        "2020_manual_evaluation_topics_v1.0.json",
        "2020qrels.txt",
        automatic="2020_automatic_evaluation_topics_v1.0.json",
    ),
    (2021, "eval"): _YearFiles(
        "2021_manual_evaluation_topics_v1.0.json",
        "trec-cast-qrels-docs.2021.qrel",
        automatic="2021_automatic_evaluation_topics_v1.0.json",
    ),
    (2022, "eval"): _YearFiles(
        "2022_evaluation_topics_flattened_duplicated_v1.0.json", "cast2022.qrel"
    ),
}


def _text(obj: Mapping[str, Any], keys: tuple[str, ...], path: Path, where: str) -> str | None:
    for key in keys:
        if obj.get(key) is not None:
            if not isinstance(obj[key], str):
                raise DataFormatError(path, "expected a string", None, f"{where}.{key}")
            return obj[key].strip()
    return None


def _number(obj: Mapping[str, Any], path: Path, where: str) -> str:
    value = obj.get("number")
    if isinstance(value, bool) or not isinstance(value, (int, str)) or value == "":
        raise DataFormatError(path, f"expected an int or string, got {value!r}", None, where)
    return str(value)


def _turn_session(
    topic: Mapping[str, Any], raw: Any, history: list[Turn], path: Path, where: str
) -> tuple[Session, str | None]:
    """One turn as a session; also returns its canonical response text (None when absent)."""
    if not isinstance(raw, Mapping):
        raise DataFormatError(path, "expected an object", None, where)
    turn_no = _number(raw, path, f"{where}.number")
    question = _text(raw, _UTTERANCE, path, where)
    if question is None:
        raise DataFormatError(path, "missing field", None, f"{where}.raw_utterance")
    response = _text(raw, _RESPONSE, path, where)
    meta: dict[str, Any] = {"topic": str(topic["number"]), "turn": turn_no}
    meta.update({k: topic[k] for k in ("title", "description") if k in topic})
    meta.update({_RENAMED.get(k, k): v for k, v in raw.items() if k not in _TEXT_KEYS})
    session = Session(
        id=f"{topic['number']}_{turn_no}",
        turns=(*history, Turn("user", question)),
        rewrite=_text(raw, ("manual_rewritten_utterance",), path, where),
        response=response,
        metadata=meta,
    )
    return session, response


def linear_sessions(topic: Mapping[str, Any], path: Path, ti: int) -> Iterator[tuple[Session, str]]:
    """The sessions of a topic whose turns are listed in order (one per user turn)."""
    history: list[Turn] = []
    for tj, raw in enumerate(topic["turn"]):
        where = f"[{ti}].turn[{tj}]"
        session, response = _turn_session(topic, raw, history, path, where)
        yield session, where
        history = [*session.turns]
        if response:
            history.append(Turn("assistant", response))


@dataclass(frozen=True)
class _Node:
    """One message of a 2022 topic tree."""

    where: str
    raw: Mapping[str, Any]
    role: str  # "user" or "assistant"
    text: str
    parent: str | None


def _tree_node(raw: Any, path: Path, where: str) -> _Node:
    if not isinstance(raw, Mapping):
        raise DataFormatError(path, "expected an object", None, where)
    who = raw.get("participant")
    role = _PARTICIPANTS.get(who.lower()) if isinstance(who, str) else None
    if role is None:
        msg = f"expected 'User' or 'System', got {who!r}"
        raise DataFormatError(path, msg, None, f"{where}.participant")
    keys, name = (_UTTERANCE, "utterance") if role == "user" else (_RESPONSE, "response")
    text = _text(raw, keys, path, where)
    if text is None:
        raise DataFormatError(path, "missing field", None, f"{where}.{name}")
    parent = raw.get("parent")
    if isinstance(parent, bool) or not isinstance(parent, (int, str, type(None))):
        raise DataFormatError(
            path, f"expected a turn number, got {parent!r}", None, f"{where}.parent"
        )
    return _Node(where, raw, role, text, None if parent is None else str(parent))


def _tree_nodes(topic: Mapping[str, Any], path: Path, ti: int) -> dict[str, _Node]:
    """A tree topic's messages by turn number, each parent checked to name one of them."""
    nodes: dict[str, _Node] = {}
    for tj, raw in enumerate(topic["turn"]):
        node = _tree_node(raw, path, f"[{ti}].turn[{tj}]")
        number = _number(node.raw, path, f"{node.where}.number")
        if number in nodes:
            raise DataFormatError(path, f"duplicate turn {number!r}", None, f"{node.where}.number")
        nodes[number] = node
    for node in nodes.values():
        if node.parent is not None and node.parent not in nodes:
            msg = f"parent {node.parent!r} names no turn of topic {topic['number']}"
            raise DataFormatError(path, msg, None, f"{node.where}.parent")
    return nodes


def _ancestors(nodes: Mapping[str, _Node], number: str, path: Path) -> list[Turn]:
    """The messages before turn `number`, oldest first, following `parent` to the root."""
    turns: list[Turn] = []
    seen, node = {number}, nodes[number]
    while node.parent is not None:
        if node.parent in seen:
            raise DataFormatError(path, "the parent chain loops", None, f"{node.where}.parent")
        seen.add(node.parent)
        node = nodes[node.parent]
        if node.text:  # an empty system response adds nothing to read
            turns.append(Turn(node.role, node.text))
    return turns[::-1]


def _tree_sessions(topic: Mapping[str, Any], path: Path, ti: int) -> Iterator[tuple[Session, str]]:
    """The sessions of a 2022 tree topic: one per User turn; its reply is the first System child."""
    nodes = _tree_nodes(topic, path, ti)
    replies: dict[str, _Node] = {}
    for node in nodes.values():
        if node.role == "assistant" and node.parent is not None:
            replies.setdefault(node.parent, node)
    for number, node in nodes.items():
        if node.role != "user":
            continue
        raw = {k: v for k, v in node.raw.items() if k != "participant"}
        if number in replies:
            reply = replies[number].raw
            raw |= {k: reply[k] for k in ("response", "provenance") if k in reply}
        history = _ancestors(nodes, number, path)
        yield _turn_session(topic, raw, history, path, node.where)[0], node.where


def _read_topics_json(path: Path) -> list[Session]:
    data = read_json(path)
    if not isinstance(data, list):
        raise DataFormatError(path, "expected a JSON list of topics")
    out: dict[str, Session] = {}
    for ti, topic in enumerate(data):
        if not isinstance(topic, Mapping) or not isinstance(topic.get("turn"), list):
            raise DataFormatError(path, "expected a topic object with a turn list", None, f"[{ti}]")
        topic = {**topic, "number": _number(topic, path, f"[{ti}].number")}
        tree = any(isinstance(t, Mapping) and "participant" in t for t in topic["turn"])
        sessions = _tree_sessions if tree else linear_sessions
        for session, where in sessions(topic, path, ti):
            first = out.setdefault(session.id, session)
            if (first.turns, first.rewrite) != (session.turns, session.rewrite):
                msg = f"duplicate id {session.id!r} repeats with another conversation"
                raise DataFormatError(path, msg, None, where)
    return list(out.values())


def read_cast_topics(path: str | Path) -> list[Session]:
    """Read any year's CAsT topic JSON into sessions (one per user turn, id `{topic}_{turn}`).

    Turns repeated by the flattened 2022 file are kept once; a repeat whose conversation differs
    from the first raises DataFormatError. Errors name the record as `[topic].turn[i].field`.
    Turns without a manual rewrite take it from a `*resolved*.tsv` beside the file (2019).
    """
    path = Path(path)
    return with_sibling_rewrites(_read_topics_json(path), path)


def read_cast_rewrites(path: str | Path, known: Collection[str] | None = None) -> dict[str, str]:
    """Read a `{topic}_{turn}<TAB>rewrite` TSV (the 2019 manual rewrites).

    Args:
        path: The TSV file.
        known: When given, every id must be one of these (the topic file's session ids).
    """
    out: dict[str, str] = {}
    for lineno, line in iter_lines(path):
        cols = line.split("\t")
        if len(cols) != 2:
            msg = f"expected 2 tab-separated columns, got {len(cols)}"
            raise DataFormatError(path, msg, lineno)
        qid, text = cols[0].strip(), cols[1].strip()
        if qid in out:
            raise DataFormatError(path, f"duplicate id {qid!r}", lineno, "id")
        if known is not None and qid not in known:
            raise DataFormatError(path, f"id {qid!r} names no turn of the topics", lineno, "id")
        out[qid] = text
    return out


def _sibling_tsvs(path: Path) -> list[Path]:
    try:
        names = sorted(p.name for p in path.parent.iterdir())
    except OSError:  # an unlistable directory: no rewrites to add, the topics still read
        return []
    return [path.parent / n for n in names if "resolved" in n and n.endswith(_TSV_ENDS)]


def with_sibling_rewrites(sessions: list[Session], path: Path) -> list[Session]:
    """Fill missing rewrites from the `*resolved*.tsv` beside `path` that covers most turns.

    A TSV is used only when every id in it names one of the sessions (so the training sample's
    TSV never lends rewrites to the evaluation topics, nor the reverse); an unreadable one is
    skipped with a warning, since the topics themselves read fine.
    """
    if all(s.rewrite for s in sessions):
        return sessions
    ids = {s.id for s in sessions}
    best: tuple[Path, dict[str, str]] | None = None
    for tsv in _sibling_tsvs(path):
        try:
            rewrites = read_cast_rewrites(tsv)
        except DataFormatError as e:
            logger.warning("not taking CAsT rewrites from %s: %s", tsv, e)
            continue
        if not rewrites.keys() <= ids:
            logger.debug("not taking CAsT rewrites from %s: it names other turns", tsv)
        elif rewrites and (best is None or len(rewrites) > len(best[1])):
            best = tsv, rewrites
    if best is None:
        return sessions
    tsv, rewrites = best
    logger.info("CAsT rewrites for %d of %d turns from %s", len(rewrites), len(sessions), tsv)
    return [dataclasses.replace(s, rewrite=s.rewrite or rewrites.get(s.id)) for s in sessions]


def _merge_automatic(sessions: list[Session], path: Path) -> list[Session]:
    """Add the fields only the automatic topic file has (e.g. its canonical result ids)."""
    auto = {s.id: s.metadata for s in _read_topics_json(path)}
    stray = sorted(set(auto) - {s.id for s in sessions})
    if stray:
        msg = f"turn {stray[0]!r} is not in the manual topics"
        raise DataFormatError(path, msg, None, "number")
    return [dataclasses.replace(s, metadata={**auto.get(s.id, {}), **s.metadata}) for s in sessions]


def _find(base: Path, name: str) -> Path | None:
    hits = sorted(base.rglob(name))
    return hits[0] if hits else None


def load_cast(root: str | Path, year: int, split: str = "eval") -> CastData:
    """Load one CAsT year's topics (with rewrites and responses) and its qrels.

    Args:
        root: The `trec-cast/` directory (holding `2019/` ... `2022/`) or one year's directory.
        year: One of `YEARS`.
        split: "eval" (evaluation topics) or "train" (2019 only).

    Returns:
        CastData; `rewrite` is the manual rewrite, `metadata["automatic_rewrite"]` the automatic
        one. Qrels are empty when the year ships none (2022 here).
    """
    if (year, split) not in _FILES:
        raise ValueError(f"no CAsT topics for year={year} split={split!r}; years: {YEARS}")
    files = _FILES[(year, split)]
    root = Path(root)
    base = root / str(year) if (root / str(year)).is_dir() else root
    topics = _find(base, files.topics)
    if topics is None:
        raise DataFormatError(base, f"no CAsT {year} topic file {files.topics} under here")
    sessions = read_cast_topics(topics)
    if files.rewrites and (rewrites_path := _find(base, files.rewrites)):
        rewrites = read_cast_rewrites(rewrites_path, known={s.id for s in sessions})
        sessions = [dataclasses.replace(s, rewrite=rewrites.get(s.id, s.rewrite)) for s in sessions]
    if files.automatic and (automatic := _find(base, files.automatic)):
        sessions = _merge_automatic(sessions, automatic)
    qrels_path = _find(base, files.qrels)
    qrels: list[Qrel] = []
    if qrels_path is None:
        logger.warning("no CAsT %d qrels (%s) under %s", year, files.qrels, base)
    else:
        qrels = read_trec_qrels(qrels_path, known_queries={s.id for s in sessions})
    logger.info("CAsT %d %s: %d turns, %d judgments", year, split, len(sessions), len(qrels))
    return CastData(year=year, sessions=sessions, qrels=qrels)
