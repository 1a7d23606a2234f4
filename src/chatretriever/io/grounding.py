"""Retrieval test collections from datasets that carry their own knowledge.

A grounded dialogue set (DSTC9-11, Doc2Dial / MultiDoc2Dial) or a conversational set with cited
passages (TREC iKAT, MTRAG, TREC CAsT) becomes a corpus and qrels that `index`, `search` and
`evaluate` take (`chatretriever data corpus`, `chatretriever data qrels`):

    corpus (`read_knowledge`)         DSTC9/10/11 `knowledge.json`: a passage per review sentence
                                      and FAQ (`io.dstc11` ids); iKAT `*_psg_text.jsonl`: the cited
                                      passages (`{doc_id}:{passage_id}`); Doc2Dial / MultiDoc2Dial
                                      `*_doc.json`: a passage per section or per document
                                      (`grounded_dialogs.read_doc2dial_docs`); a BEIR JSONL or TSV
                                      corpus as it is
    qrels (`grounding_qrels`)         relevance 1 for each passage a session's answer is grounded
                                      in, as its reader records it (`GROUNDING_KEYS`); Doc2Dial's
                                      grounding spans are mapped to the sections that hold them
                                      when the documents are given, else to their documents

Sessions without grounding (DSTC's turns that seek no knowledge, unanswerable turns) get no
judgments: `evaluate` leaves them out. Torch-free.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from chatretriever.errors import DataFormatError
from chatretriever.io.corpus import read_corpus
from chatretriever.io.dstc11 import read_knowledge as read_dstc_knowledge
from chatretriever.io.formats import guess_format, read_head
from chatretriever.io.grounded_dialogs import passage_id, read_doc2dial_docs
from chatretriever.io.ikat import read_ikat_passages
from chatretriever.types import Passage, Qrel, Session

# where each reader records the passages a session is grounded in, in the order looked up
GROUNDING_KEYS = (
    "snippet_ids",  # DSTC9/10/11 (labels.json knowledge)
    "passage_ids",  # TREC iKAT (response_provenance)
    "context_ids",  # MTRAG reference.jsonl (contexts)
    "provenance",  # TREC CAsT 2022 (the response's passages)
)
KNOWLEDGE_FORMATS = ("dstc-knowledge", "ikat-passages", "doc2dial-docs", "corpus")

logger = logging.getLogger(__name__)


def knowledge_format(path: str | Path) -> str:
    """Which of `KNOWLEDGE_FORMATS` a file holds, from its first bytes.

    Raises:
        DataFormatError: A conversation, qrels or run file (`formats.guess_format` tells it),
            named as such: read as a JSONL corpus it would fail as "malformed JSON".
    """
    head = read_head(Path(path)).lstrip()
    if re.match(r'\{\s*"doc_data"\s*:', head):
        return "doc2dial-docs"
    first = head.split("\n", 1)[0]
    if head.startswith("{") and '"passage_text"' in first:
        return "ikat-passages"
    if head.startswith("{") and re.search(r'"(reviews|faqs|docs)"\s*:', head):
        if not re.search(r'"(_id|text)"\s*:', first):  # a corpus line names its _id and text
            return "dstc-knowledge"
    _refuse_other_kind(path)
    return "corpus"


def read_knowledge(
    path: str | Path, fmt: str | None = None, granularity: str = "section"
) -> list[Passage]:
    """The passages of a knowledge file (module doc), in the file's order.

    Args:
        path: The file.
        fmt: One of `KNOWLEDGE_FORMATS`; told from the file when None.
        granularity: Doc2Dial documents split by "section" or kept whole ("document").
    """
    fmt = fmt or knowledge_format(path)
    if fmt == "dstc-knowledge":
        return list(read_dstc_knowledge(path).values())
    if fmt == "ikat-passages":
        return list(read_ikat_passages(path).values())
    if fmt == "doc2dial-docs":
        return read_doc2dial_docs(path, granularity)
    if fmt == "corpus":
        return read_corpus(path)
    raise ValueError(
        f"unknown knowledge format {fmt!r}; choose from {', '.join(KNOWLEDGE_FORMATS)}"
    )


# what `formats.guess_format` may call a corpus file: a BEIR query file and a `qid<TAB>text` file
# have a corpus's shape (MS MARCO's collection.tsv is told apart by its name only)
_CORPUS_SHAPES = ("beir-corpus", "beir-queries", "queries-tsv")


def _refuse_other_kind(path: str | Path) -> None:
    """Refuse a file told to be a conversation, qrels or run file (not knowledge), naming what it
    holds: read as a JSONL corpus it would fail on its first line as "malformed JSON"."""
    try:
        kind = guess_format(path)
    except DataFormatError:
        return  # not told apart: read as a corpus, whose reader names the bad line
    if kind not in _CORPUS_SHAPES:
        raise DataFormatError(
            path,
            f"holds {kind} data, not knowledge: give a DSTC9-11 knowledge.json, an iKAT "
            "*_psg_text.jsonl, a Doc2Dial *_doc.json or a BEIR corpus (`data qrels` reads "
            "conversations)",
        )


def _span_sections(passages: Iterable[Passage]) -> dict[tuple[str, str], str]:
    """(published doc id, span id) -> the id of the section passage holding the span."""
    out: dict[tuple[str, str], str] = {}
    for p in passages:
        for span in p.metadata.get("spans") or ():
            out[(str(p.metadata.get("doc_id")), str(span))] = p.id
    return out


def _doc2dial_ids(session: Session, sections: dict[tuple[str, str], str] | None) -> list[str]:
    if sections is None:
        return [passage_id(str(d)) for d in session.metadata.get("doc_ids") or ()]
    out = []
    for ref in session.metadata.get("spans") or ():
        doc, _, span = str(ref).rpartition("#")  # document ids may hold '#', span ids do not
        pid = sections.get((doc, span))
        if pid is None:
            raise ValueError(
                f"session {session.id!r} is grounded in span {ref!r}, which no section of the "
                "documents holds (documents of another release?)"
            )
        out.append(pid)
    return out


def grounding_ids(
    session: Session, sections: dict[tuple[str, str], str] | None = None
) -> list[str]:
    """The passage ids a session's answer is grounded in (none: an empty list). Whitespace
    inside a recorded id is dropped (CAsT 2022 publishes "MARCO_50_2268879788 -3" for
    "MARCO_50_2268879788-3"; TREC files cannot hold it), with a warning."""
    if "doc_ids" in session.metadata or "spans" in session.metadata:
        ids = _doc2dial_ids(session, sections)
    else:
        key = next((k for k in GROUNDING_KEYS if session.metadata.get(k)), None)
        value = session.metadata.get(key) if key else None
        ids = [str(v) for v in value] if isinstance(value, (list, tuple)) else []
    cleaned = ["".join(i.split()) for i in ids]
    for before, after in zip(ids, cleaned, strict=True):
        if before != after:
            logger.warning("session %r: grounding id %r read as %r", session.id, before, after)
    return list(dict.fromkeys(i for i in cleaned if i))


def grounding_qrels(
    sessions: Sequence[Session], documents: Sequence[Passage] | None = None
) -> list[Qrel]:
    """Relevance-1 judgments of each session's grounding passages (module doc).

    Args:
        sessions: Sessions as their readers return them.
        documents: Doc2Dial section passages (`read_doc2dial_docs`): grounding spans are judged
            at their sections; None: Doc2Dial sessions are judged at their documents.
    """
    sections = _span_sections(documents) if documents is not None else None
    qrels = [Qrel(s.id, pid, 1) for s in sessions for pid in grounding_ids(s, sections)]
    judged = {q.query_id for q in qrels}
    vague = [s.id for s in sessions if s.id in judged and _underspecified(s)]
    if vague:  # MTRAG's own retrieval qrels judge none of them
        logger.warning(
            "%d judged sessions are marked UNDERSPECIFIED (first: %r): MTRAG's published "
            "retrieval qrels leave such tasks out, so scores on these qrels are not comparable "
            "with published ones unless they are dropped",
            len(vague),
            vague[0],
        )
    return qrels


def _underspecified(session: Session) -> bool:
    """Whether a session's answerability label (MTRAG's) says the question is underspecified."""
    return "UNDERSPECIFIED" in str(session.metadata.get("answerability") or "").upper()
