"""Item retrieval (RecLM-emb): `build-items`, `train-items`, `eval-items`, `recommend`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from chatretriever.methods.items.schema import CatalogSchema
    from chatretriever.types import Passage


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the item-retrieval sub-commands."""
    p = sub.add_parser(
        "build-items",
        help="generate the ten item-query tasks from a RecLM-emb domain (training JSONL, "
        "test queries + qrels)",
    )
    p.add_argument("root", help="domain dir with metadata.jsonl(.gz) and sequential_data.txt")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--train-per-task", type=int, default=800)
    p.add_argument("--test-per-task", type=int, default=200)
    p.add_argument("--tasks", nargs="+", default=None, help="task codes (default: all ten)")
    p.add_argument(
        "--catalog-size",
        type=int,
        default=None,
        help="items kept: every item of a history, then random others up to this many "
        "(default: all)",
    )
    p.add_argument("--test-fraction", type=float, default=0.1, help="share of test users")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--schema",
        default=None,
        metavar="FILE|infer",
        help="what the items' fields are: a JSON/YAML schema file, or 'infer' (from the data; "
        "printed, and saved as OUT/schema.json like every schema used); default: Steam's",
    )
    p.add_argument(
        "--paraphrase-llm", default=None, help="a local chat LLM rewrites US2I/AS2I queries"
    )
    p.add_argument(
        "--paraphrase-cache", default=None, help="JSONL cache (default OUT/paraphrase_cache.jsonl)"
    )
    p.set_defaults(func=cmd_build_items)

    p = sub.add_parser("train-items", help="fine-tune an item embedder from a YAML recipe")
    p.add_argument("recipe", help="YAML recipe (configs/items-minilm.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    p.add_argument("--dry-run", action="store_true", help="print the resolved recipe and stop")
    p.add_argument(
        "--embedder",
        choices=("sentence", "chatretriever"),
        default="sentence",
        help="sentence: a sentence-transformer, mean pooling (minilm-l6, mpnet-base); "
        "chatretriever: a chat LLM with EMB tokens and LoRA (e.g. smollm2-135m-instruct)",
    )
    p.set_defaults(func=cmd_train_items)

    p = sub.add_parser("eval-items", help="evaluate a retriever on built item tasks")
    p.add_argument("data", help="a build-items output directory")
    p.add_argument("--model", required=True, help="'bm25', an embedder name or a model dir")
    p.add_argument("--out", default=None, help="write the results JSON here")
    p.set_defaults(func=cmd_eval_items)

    p = sub.add_parser("recommend", help="chat with a conversational item recommender")
    p.add_argument("--items", required=True, help="catalog (build-items catalog.jsonl.gz, a "
                   "RecLM-emb domain dir or its metadata.jsonl)")  # fmt: skip
    p.add_argument(
        "--model",
        default="items-minilm",
        help="item embedder (default items-minilm, the built-in one fine-tuned on the item tasks)",
    )
    p.add_argument("--llm", default="smollm2-135m-instruct", help="chat LLM ('none': list)")
    p.add_argument(
        "--schema",
        default=None,
        metavar="FILE|infer",
        help="the catalog's schema file, or 'infer'; default: the schema.json beside a "
        "build-items catalog, else Steam's",
    )
    p.set_defaults(func=cmd_recommend)


def _schema(arg: str | None, items: list[Passage] | None = None) -> CatalogSchema:
    """The `--schema` argument: None (Steam's), a file, or "infer" (from `items`)."""
    from chatretriever.methods.items.schema import STEAM_SCHEMA, load_schema

    if arg is None:
        return STEAM_SCHEMA
    if arg != "infer":
        return load_schema(arg)
    from chatretriever.methods.items.infer import infer_schema

    return infer_schema(items or [])


def cmd_build_items(args: argparse.Namespace) -> int:
    from chatretriever.io.reclm import load_reclm
    from chatretriever.methods.items.build import BuildConfig, build_items
    from chatretriever.methods.items.schema import SCHEMA_FILE
    from chatretriever.methods.items.templates import TASKS

    config = BuildConfig(
        train_per_task=args.train_per_task,
        test_per_task=args.test_per_task,
        tasks=list(args.tasks or TASKS),
        catalog_size=args.catalog_size,
        test_fraction=args.test_fraction,
        seed=args.seed,
    )
    _check_out(args.out, directory=True)
    # a schema file is read first: a bad one stops before the items are
    schema = None if args.schema == "infer" else _schema(args.schema)
    data = load_reclm(args.root)
    if schema is None:
        schema = _schema(args.schema, data.items)
        where = Path(args.out) / SCHEMA_FILE
        print(
            f"inferred schema (saved as {where}; edit it, pass it as --schema FILE):",
            file=sys.stderr,
        )
        print(json.dumps(schema.to_dict(), indent=2), file=sys.stderr, flush=True)
    rewrite = None
    if args.paraphrase_llm:
        from chatretriever.methods.items.paraphrase import ParaphraseCache, paraphrase_queries
        from chatretriever.methods.items.recommend import llm_chat
        from chatretriever.modeling.backbones import load_backbone

        cache = ParaphraseCache(args.paraphrase_cache or Path(args.out) / "paraphrase_cache.jsonl")
        chat = llm_chat(*load_backbone(args.paraphrase_llm, kind="causal"), max_new_tokens=48)

        def rewrite(queries):
            try:
                return paraphrase_queries(
                    queries,
                    chat,
                    cache,
                    args.paraphrase_llm,
                    noun=schema.noun,
                    nouns=schema.plural,
                )
            finally:  # also on Ctrl-C or an LLM error: the replies so far are kept
                cache.save()

    counts = build_items(data, args.out, config, rewrite, schema)
    print(json.dumps(counts))
    return 0


def cmd_train_items(args: argparse.Namespace) -> int:
    from chatretriever.methods.items.recipe import load_item_recipe, run_item_training

    config = load_item_recipe(args.recipe, args.overrides)
    if args.dry_run:
        import yaml

        yaml.safe_dump(config.to_dict(), sys.stdout, sort_keys=False)
        return 0
    from chatretriever.modeling.backbones import is_chat_llm

    if args.embedder == "sentence" and is_chat_llm(config.model):
        raise ValueError(
            f"{config.model} is a chat LLM or a trained ChatRetriever, not a sentence "
            "transformer: pass --embedder chatretriever"
        )
    model = _chatretriever_embedder(config) if args.embedder == "chatretriever" else None
    print(f"saved {run_item_training(config, resume=args.resume, model=model)}")
    return 0


def _chatretriever_embedder(config):
    """A ChatRetriever (last EMB token) as the items method's `ItemEmbedder`: built here, where
    both methods may be imported, and passed into the items trainer (dependency injection)."""
    import torch

    from chatretriever.config import RetrieverConfig
    from chatretriever.methods.chatretriever.model import ChatRetriever
    from chatretriever.modeling.collate import encode_batch

    class ChatRetrieverItems(torch.nn.Module):
        def __init__(self, retriever: ChatRetriever) -> None:
            super().__init__()
            self.retriever = retriever

        def embed(self, texts, side):
            t = self.retriever.template
            if side == "query":
                seqs = t.session_ids_batch([[{"role": "user", "content": x}] for x in texts])
            else:
                seqs = t.passage_ids_batch(list(texts))
            r = self.retriever
            return r.embed(encode_batch(seqs, r.pad_id, r.padding_side))  # (B, D)

        def save_pretrained(self, directory):
            return self.retriever.save_pretrained(directory)

        def load_trainable_state(self, directory):
            self.retriever.load_trainable_state(directory)

    lengths = RetrieverConfig(
        max_session_len=config.lengths.query, max_passage_len=config.lengths.item
    )
    retriever = ChatRetriever.from_pretrained(
        config.model, config=lengths, is_trainable=True, device="cpu"
    )
    return ChatRetrieverItems(retriever)


def cmd_eval_items(args: argparse.Namespace) -> int:
    from chatretriever.methods.items.evaluate import (
        bm25_ranker,
        dense_ranker,
        evaluate_ranker,
        load_test_set,
        results_table,
    )

    if args.out:
        _check_out(args.out, directory=False)  # before minutes of evaluation, not after
    items, sessions, qrels = load_test_set(Path(args.data))
    if args.model == "bm25":
        rank = bm25_ranker(items)
    else:
        from chatretriever.apps.registry import load_encoder

        rank = dense_ranker(load_encoder(args.model), items, show_progress=True)
    results = evaluate_ranker(rank, items, sessions, qrels, name=args.model)
    print(results_table({args.model: results}, "hit@5"), flush=True)  # shown even if --out fails
    if args.out:
        from chatretriever.retrieval.evaluate import write_json

        try:
            write_json(args.out, results)
        except OSError as e:
            raise ValueError(f"{args.out}: cannot write the results: {e.strerror or e}") from None
    return 0


def _check_out(path: str | Path, directory: bool) -> None:
    """Refuse an output path that cannot be written, before any work: a file where a directory
    is wanted (or the reverse), or a parent that is a file or not writable."""
    path = Path(path)
    if path.exists() and path.is_dir() != directory:
        want, found = ("a directory", "a file") if directory else ("a file", "a directory")
        raise ValueError(f"{path}: --out must be {want}, and this is {found}")
    parent = path if directory else path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"{path}: cannot write here: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{path}: cannot write here: {parent} is not writable")


def _catalog(path: str, schema_arg: str | None) -> tuple[list[Passage], CatalogSchema | None]:
    """(items, schema or None) of a build-items catalog, a RecLM-emb domain dir or that domain's
    metadata.jsonl(.gz). The schema: `--schema`, else the `schema.json` beside a build-items
    catalog; None where neither is there (items render as Steam's, and the recommender names
    them as `catalog_noun` does)."""
    from chatretriever.io.reclm import load_reclm, read_reclm_items
    from chatretriever.methods.items.build import read_catalog
    from chatretriever.methods.items.catalog import render_item
    from chatretriever.methods.items.schema import SCHEMA_FILE, STEAM_SCHEMA
    from chatretriever.types import Passage

    if Path(path).is_dir():
        items = load_reclm(path).items
    elif Path(path).name.startswith("metadata.jsonl"):  # the RecLM-emb item file itself
        items = read_reclm_items(path)
    else:
        saved = Path(path).parent / SCHEMA_FILE
        if schema_arg is None and saved.is_file():
            schema_arg = str(saved)
        items = read_catalog(path)
    schema = None if schema_arg is None else _schema(schema_arg, items)
    shown = schema or STEAM_SCHEMA
    return [Passage(p.id, render_item(p, shown), p.title, p.metadata) for p in items], schema


def cmd_recommend(args: argparse.Namespace) -> int:
    from chatretriever.apps.registry import load_encoder
    from chatretriever.methods.items.recommend import ItemRecommender, llm_chat
    from chatretriever.modeling.backbones import load_backbone

    items, schema = _catalog(args.items, args.schema)  # a bad catalog stops before any model
    chat = llm_chat(*load_backbone(args.llm, kind="causal")) if args.llm != "none" else None
    recommender = ItemRecommender(load_encoder(args.model), items, chat, schema=schema)
    interactive = sys.stdin.isatty()
    if interactive:
        print("Item recommender: say what you like (:reset starts over, :quit or Ctrl-D ends).")
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            return 0
        text = line.strip()
        if text in (":quit", ":q"):
            return 0
        if text == ":reset":
            recommender.reset()
            print("(conversation reset)", flush=True)
        elif text:
            print(recommender.respond(text).text, flush=True)
