"""The rows of benchmarks/rag.py: which systems run (`--systems`, `--ablation`), how each one
retrieves and what answers (`RagSystem`), and the line that describes it."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from _conversational.systems import missing_model, parse_model, slug

SYSTEMS = ("uniconv", "decoupled", "bm25", "closed-book", "oracle", "retriever-as-generator")


@dataclass(frozen=True)
class RagSystem:
    """One row of the table: how it retrieves and what answers.

    Attributes:
        id: Row name (also the answers file name).
        retrieval: "dense", "bm25", "oracle" (the judged-relevant passages) or "none".
        retriever: The dense retriever's model spec (`registry.load_encoder`), else None.
        label: The retriever's name in file names ("uniconv", "chatretriever-smol", ...).
        answerer: "self" (the retriever answers: UniConv), "llm" (`generator` behind a
            `GroundedGenerator`) or "retriever-lm" (the retriever's own causal LM).
        generator: The chat LLM of "llm", else None.
    """

    id: str
    retrieval: str
    retriever: str | None
    label: str
    answerer: str
    generator: str | None = None

    @property
    def run_id(self) -> str | None:
        """The cached run's name (systems retrieving alike share it), None without a run."""
        if self.retrieval == "dense":
            return slug(f"{self.label}.session")
        return "bm25.last_turn" if self.retrieval == "bm25" else None


def plan_systems(args: argparse.Namespace) -> tuple[list[RagSystem], list[dict[str, str]]]:
    """The rows to run, in table order, and the ones skipped with the reason."""
    out: list[RagSystem] = []
    skipped: list[dict[str, str]] = []
    chosen = set(args.systems)
    label, spec = parse_model(args.retriever)
    gen = args.generator
    if "uniconv" in chosen:
        if args.uniconv:
            out.append(RagSystem("uniconv", "dense", args.uniconv, "uniconv", "self"))
        else:
            skipped.append({"system": "uniconv", "reason": "no --uniconv DIR given"})
    plain = {
        "decoupled": RagSystem("decoupled", "dense", spec, label, "llm", gen),
        "bm25": RagSystem("bm25", "bm25", None, "bm25", "llm", gen),
        "closed-book": RagSystem("closed-book", "none", None, "", "llm", gen),
        "oracle": RagSystem("oracle", "oracle", None, "oracle", "llm", gen),
        "retriever-as-generator": RagSystem(
            "retriever-as-generator", "dense", spec, label, "retriever-lm"
        ),
    }
    out += [system for name, system in plain.items() if name in chosen]
    for text in args.ablation:
        name, sep, path = text.partition("=")
        if not (sep and name.strip() and path.strip()):
            raise ValueError(f"--ablation {text!r}: expected NAME=DIR")
        name, path = parse_model(text)
        out.append(RagSystem(name, "dense", path, name, "self"))
    kept = []
    for system in out:
        why = next(filter(None, (missing_model(m) for m in _models(system))), None)
        if why:
            skipped.append({"system": system.id, "reason": why})
        else:
            kept.append(system)
    ids = [s.id for s in kept]
    if len(set(ids)) != len(ids):
        raise ValueError(f"two systems share a name: {ids}; give each --ablation its own NAME")
    rows = [*ids, *(s["system"] for s in skipped)]
    if args.ablation and args.ablation_baseline not in rows:
        raise ValueError(
            f"--ablation-baseline {args.ablation_baseline!r} is none of the rows {rows}"
        )
    return kept, skipped


def _models(system: RagSystem) -> list[str]:
    return [m for m in (system.retriever, system.generator) if m]


def describe(system: RagSystem, k: int) -> str:
    reads = {
        "dense": f"top {k} of {system.label} (whole session)",
        "bm25": f"top {k} of BM25 (last turn)",
        "oracle": f"the judged-relevant passages (at most {k})",
        "none": "no passages",
    }[system.retrieval]
    who = {"self": system.label, "llm": system.generator, "retriever-lm": f"{system.label}'s LM"}
    return f"{who[system.answerer]} answers from {reads}"
