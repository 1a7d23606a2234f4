"""TREC qrels (graded), BEIR qrels TSV, JSON qrels and 6-column TREC run files."""

from __future__ import annotations

import logging
import math
from collections.abc import Collection, Iterable, Iterator
from pathlib import Path

from chatretriever.errors import DataFormatError
from chatretriever.io.atomic import atomic_write
from chatretriever.io.files import check_id, iter_lines, read_json
from chatretriever.types import Qrel, Run, rank_key

logger = logging.getLogger(__name__)


def _check_known(
    path: str | Path,
    line: int | None,
    qid: str,
    did: str,
    known_queries: Collection[str] | None,
    known_docs: Collection[str] | None,
) -> None:
    if known_queries is not None and qid not in known_queries:
        raise DataFormatError(path, f"query id {qid!r} names no known query", line, "query_id")
    if known_docs is not None and did not in known_docs:
        raise DataFormatError(
            path, f"doc id {did!r} names no document in the corpus", line, "doc_id"
        )


def _int(path: str | Path, line: int | None, value: str, field: str) -> int:
    try:
        return int(float(value)) if "." in value else int(value)
    except ValueError:
        raise DataFormatError(path, f"not a number: {value!r}", line, field) from None


def _collect(
    path: str | Path,
    rows: Iterator[tuple[int | None, str, str, str]],
    known_queries: Collection[str] | None,
    known_docs: Collection[str] | None,
    rel_field: str,
) -> list[Qrel]:
    """Validate (line, qid, docid, grade) rows into qrels.

    A repeated line with the same grade is kept once (official files have a few); a repeat with
    another grade is ambiguous and raises.
    """
    out: list[Qrel] = []
    grades: dict[tuple[str, str], int] = {}
    for lineno, qid, did, rel in rows:
        _check_known(path, lineno, qid, did, known_queries, known_docs)
        grade = _int(path, lineno, rel, rel_field)
        before = grades.setdefault((qid, did), grade)
        if before != grade:
            msg = f"({qid}, {did}) judged {before} before, now {grade}"
            raise DataFormatError(path, msg, lineno, rel_field)
        if len(grades) > len(out):
            out.append(Qrel(qid, did, grade))
        else:
            logger.debug("%s:%d: repeated judgment (%s, %s) kept once", path, lineno, qid, did)
    return out


def _trec_rows(path: str | Path) -> Iterator[tuple[int, str, str, str]]:
    for lineno, line in iter_lines(path):
        cols = line.split()
        if len(cols) != 4:
            raise DataFormatError(path, f"expected 4 columns, got {len(cols)}", lineno)
        yield lineno, cols[0], cols[2], cols[3]


def _beir_rows(path: str | Path) -> Iterator[tuple[int, str, str, str]]:
    for lineno, line in iter_lines(path):
        cols = line.split("\t")
        if lineno == 1 and cols[0].strip().lower() in ("query-id", "query_id", "qid"):
            continue
        if len(cols) != 3:
            msg = f"expected 3 tab-separated columns, got {len(cols)}"
            raise DataFormatError(path, msg, lineno)
        qid, did, rel = (c.strip() for c in cols)
        yield lineno, qid, did, rel


def _json_rows(path: str | Path) -> Iterator[tuple[int | None, str, str, str]]:
    data = read_json(path)
    if not isinstance(data, dict):
        raise DataFormatError(path, 'expected a JSON object {"query id": {"doc id": grade}}')
    for qid, docs in data.items():
        if not isinstance(docs, dict):
            raise DataFormatError(path, "expected an object of doc id: grade", None, qid)
        check_id(str(qid), path, None, "query id")
        for did, rel in docs.items():
            if isinstance(rel, bool) or not isinstance(rel, (int, float)):
                raise DataFormatError(path, f"expected a number, got {rel!r}", None, f"{qid}.{did}")
            check_id(str(did), path, None, f"{qid} doc id")
            yield None, str(qid), str(did), str(rel)


def read_json_qrels(
    path: str | Path,
    known_queries: Collection[str] | None = None,
    known_docs: Collection[str] | None = None,
) -> list[Qrel]:
    """Read qrels as one JSON object `{"query id": {"doc id": grade}}` (pytrec_eval's layout;
    OR-QuAC's `qrels.txt`)."""
    return _collect(path, _json_rows(path), known_queries, known_docs, "grade")


def read_trec_qrels(
    path: str | Path,
    known_queries: Collection[str] | None = None,
    known_docs: Collection[str] | None = None,
) -> list[Qrel]:
    """Read `qid iter docid relevance` lines (whitespace separated, graded)."""
    return _collect(path, _trec_rows(path), known_queries, known_docs, "relevance")


def read_beir_qrels(
    path: str | Path,
    known_queries: Collection[str] | None = None,
    known_docs: Collection[str] | None = None,
) -> list[Qrel]:
    """Read BEIR qrels TSV (`query-id corpus-id score`, optional header line)."""
    return _collect(path, _beir_rows(path), known_queries, known_docs, "score")


def read_qrels(
    path: str | Path,
    known_queries: Collection[str] | None = None,
    known_docs: Collection[str] | None = None,
) -> list[Qrel]:
    """Read qrels in TREC, BEIR TSV or JSON form, told apart by the first line (a file of
    another kind, e.g. a run or sessions, is refused naming it)."""
    try:
        for _, first in iter_lines(path):
            if first.lstrip().startswith("{"):
                return read_json_qrels(path, known_queries, known_docs)
            beir = "\t" in first and len(first.split("\t")) == 3
            reader = read_beir_qrels if beir else read_trec_qrels
            return reader(path, known_queries, known_docs)
    except DataFormatError as e:
        from chatretriever.io.kinds import QRELS_KINDS, first_line_error

        raise first_line_error(path, e, "qrels", QRELS_KINDS) from None
    return []


def read_qrels_files(paths: str | Path | Iterable[str | Path]) -> list[Qrel]:
    """Read and merge qrels from several files or directories (`read_qrels` each).

    Collections often publish their judgments per domain or per year (MTRAG's
    `qrels/{clapnq,cloud,fiqa,govt}.tsv`); a directory stands for its non-hidden files, in name
    order. A judgment repeated with the same grade is kept once.

    Args:
        paths: Qrels files and/or directories holding them.

    Returns:
        The merged judgments, in reading order.

    Raises:
        DataFormatError: An empty directory, a file read as in `read_qrels`, or a (query, doc)
            pair two files grade differently (naming both files).
    """
    files: list[Path] = []
    for path in [paths] if isinstance(paths, (str, Path)) else paths:
        path = Path(path)
        if path.is_dir():
            inside = sorted(f for f in path.iterdir() if f.is_file() and not f.name.startswith("."))
            if not inside:
                raise DataFormatError(path, "is a directory holding no qrels file")
            files.extend(inside)
        else:
            files.append(path)
    merged: dict[tuple[str, str], tuple[Qrel, Path]] = {}
    for f in files:
        for q in read_qrels(f):
            before = merged.setdefault((q.query_id, q.doc_id), (q, f))
            if before[0].relevance != q.relevance:
                msg = (f"({q.query_id}, {q.doc_id}) judged {q.relevance} here but "
                       f"{before[0].relevance} in {before[1]}")  # fmt: skip
                raise DataFormatError(f, msg, None, "relevance")
    return [q for q, _ in merged.values()]


def write_qrels(path: str | Path, qrels: Iterable[Qrel]) -> int:
    """Write TREC qrels (`qid 0 docid rel`) atomically."""
    n = 0
    with atomic_write(path) as f:
        for q in qrels:
            f.write(f"{q.query_id} 0 {q.doc_id} {q.relevance}\n")
            n += 1
    return n


def read_run(
    path: str | Path,
    known_queries: Collection[str] | None = None,
    known_docs: Collection[str] | None = None,
) -> Run:
    """Read a 6-column TREC run (`qid Q0 docid rank score tag`). Ranks are recomputed."""
    scores: dict[str, dict[str, float]] = {}
    name = "run"
    for lineno, line in iter_lines(path):
        cols = line.split()
        if len(cols) != 6:
            error = DataFormatError(path, f"expected 6 columns, got {len(cols)}", lineno)
            from chatretriever.io.kinds import RUN_KINDS, first_line_error

            raise first_line_error(path, error, "a run", RUN_KINDS)
        qid, _, did, _, score, name = cols
        _check_known(path, lineno, qid, did, known_queries, known_docs)
        try:
            value = float(score)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):  # NaN would make the ranking undefined
            raise DataFormatError(path, f"score is not a finite number: {score!r}", lineno, "score")
        docs = scores.setdefault(qid, {})
        if did in docs:
            raise DataFormatError(
                path, f"doc {did!r} listed twice for query {qid!r}", lineno, "doc_id"
            )
        docs[did] = value
    return Run(scores=scores, name=name)


def write_run(path: str | Path, run: Run, depth: int | None = None) -> int:
    """Write a run as 6 TREC columns atomically, ranked by (-score, docid)."""
    n = 0
    tag = run.name.replace(" ", "_") or "run"
    with atomic_write(path) as f:
        for qid in sorted(run.scores):
            docs = sorted(run.scores[qid].items(), key=lambda kv: rank_key(kv[0], kv[1]))
            for rank, (did, score) in enumerate(docs[:depth], start=1):
                if rank == 1:
                    check_id(qid, path, None, "query id")
                check_id(did, path, None, "document id")
                # repr keeps every digit: rounding could create ties the ranks above do not show
                f.write(f"{qid} Q0 {did} {rank} {float(score)!r} {tag}\n")
                n += 1
    return n
