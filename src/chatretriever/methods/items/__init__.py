"""RecLM-emb versatile item retrieval: the ten item-query tasks, item-embedder training and
evaluation, and a conversational recommender.

The entry points are importable from here (loaded on first use, so importing this package loads
neither torch nor a model)::

    from chatretriever.methods.items import BuildConfig, build_items, load_test_set
    from chatretriever.methods.items import CatalogSchema, infer_schema, load_schema
"""

from __future__ import annotations

from chatretriever.lazy import lazy_exports

# name -> the module that defines it
_EXPORTS = {
    "BuildConfig": "build",
    "build_items": "build",
    "read_catalog": "build",
    "write_catalog": "build",
    "CatalogSchema": "schema",
    "STEAM_SCHEMA": "schema",
    "load_schema": "schema",
    "infer_schema": "infer",
    "ItemCatalog": "catalog",
    "Constraint": "catalog",
    "render_item": "catalog",
    "generate": "tasks",
    "load_test_set": "evaluate",
    "bm25_ranker": "evaluate",
    "dense_ranker": "evaluate",
    "evaluate_ranker": "evaluate",
    "evaluate_items": "evaluate",
    "rank_items": "evaluate",
    "results_table": "evaluate",
    "hit_at_k": "metrics",
    "precision_at_k": "metrics",
    "constraint_coverage_at_k": "metrics",
    "ItemRecommender": "recommend",
    "iter_item_examples": "data",
    "load_item_recipe": "recipe",
    "run_item_training": "recipe",
}


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
