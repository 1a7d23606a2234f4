"""Build the item-retrieval data set: training JSONL, test queries + qrels, the catalog.

Users are split by a hash of their id (a test user never trains); test targets are each test
user's last item (leave-last-out). I2I source items are split the same way, by item id, and the
co-occurrence behind I2I comes from training users only. Test queries use the test templates;
a test query whose text is also a training query is dropped. Output directory::

    catalog.jsonl.gz        the evaluated items: {"id", "title", <metadata fields>} (a metadata
                            field `id` is kept as `metadata_id`: see `write_catalog`)
    train.jsonl.gz          training examples in the project's JSONL (see `data.py`)
    test/queries.jsonl      sessions JSONL (one user turn); metadata: task, exclude, constraints
    test/qrels.txt          TREC qrels of the targets
    build_config.json       the resolved `BuildConfig`, counts per task and the tasks skipped
    schema.json             the `CatalogSchema` the items were read with (`eval-items` and
                            `recommend` read it back)

A task that needs a kind of field the catalog lacks (VC2I without a price or a date, US2I
without a tag field, ...) is skipped with one warning naming the task and what it misses.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from chatretriever.errors import DataFormatError
from chatretriever.io.atomic import atomic_write
from chatretriever.io.files import iter_jsonl, require, require_id, write_jsonl
from chatretriever.io.reclm import RecLMData, UserHistory
from chatretriever.io.sessions import write_sessions
from chatretriever.io.trec import write_qrels
from chatretriever.methods.items.catalog import ItemCatalog, render_item, unusable_values
from chatretriever.methods.items.plan import plan_tasks
from chatretriever.methods.items.schema import SCHEMA_FILE, STEAM_SCHEMA, CatalogSchema, save_schema
from chatretriever.methods.items.tasks import ItemQuery, TaskContext, cooccurrence, generate
from chatretriever.methods.items.templates import TASKS
from chatretriever.types import Passage, Qrel, Session, Turn

logger = logging.getLogger(__name__)

CATALOG_FILE = "catalog.jsonl.gz"
TRAIN_FILE = "train.jsonl.gz"
QUERIES_FILE = "test/queries.jsonl"
QRELS_FILE = "test/qrels.txt"
CONFIG_FILE = "build_config.json"
MAX_TRAIN_POSITIVES = 5  # full texts per training example (all ids stay in metadata.relevant)


@dataclass
class BuildConfig:
    """How much data to build and how.

    Attributes:
        train_per_task: Training queries per task (UH2I and I2I get `behaviour_boost` times
            more: the paper found the behaviour tasks the hardest to learn).
        test_per_task: Test queries per task (before removing those seen in training).
        tasks: The tasks to build.
        behaviour_boost: Multiplier of UH2I and I2I training queries.
        test_fraction: Share of users (and of I2I source items) held out for testing.
        catalog_size: Keep every item of a history plus random others up to this many items
            (None: the whole catalog).
        max_history: Most titles in a history query.
        max_targets: Most items an attribute query may match.
        n_negatives: Negatives per query.
        seed: The random seed.
    """

    train_per_task: int = 800
    test_per_task: int = 200
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    behaviour_boost: int = 2
    test_fraction: float = 0.1
    catalog_size: int | None = None
    max_history: int = 20
    max_targets: int = 100
    n_negatives: int = 7
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"unknown tasks {unknown}; tasks: {', '.join(TASKS)}")
        if not 0 < self.test_fraction < 1:
            raise ValueError(f"test_fraction must be in (0, 1), got {self.test_fraction}")
        counts = {
            "train_per_task": self.train_per_task,
            "test_per_task": self.test_per_task,
            "behaviour_boost": self.behaviour_boost,
            "max_history": self.max_history,
            "max_targets": self.max_targets,
            "catalog_size": 1 if self.catalog_size is None else self.catalog_size,
        }
        for name, value in counts.items():
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if self.n_negatives < 0:
            raise ValueError(f"n_negatives must be at least 0, got {self.n_negatives}")


def in_test(key: str, fraction: float, seed: int) -> bool:
    """Whether a user (or item) id falls in the test share (a stable hash of seed and id)."""
    h = hashlib.blake2b(f"{seed}\x1f{key}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2**64 < fraction


def subsample_catalog(data: RecLMData, size: int | None, seed: int) -> list[Passage]:
    """Every item of a history plus random other items up to `size` (catalog order kept)."""
    if size is None or size >= len(data.items):
        return list(data.items)
    needed = {i for h in data.histories for i in h.items}
    if len(needed) > size:
        logger.warning(
            "catalog size %d: the histories name %d items, every one kept", size, len(needed)
        )
    rest = [p.id for p in data.items if p.id not in needed]
    extra = random.Random(seed).sample(rest, max(0, min(len(rest), size - len(needed))))
    keep = needed | set(extra)
    return [p for p in data.items if p.id in keep]


HISTORY_TASKS = ("UH2I", "I2I", "US2I", "UQ2I")  # the tasks drawn from user histories


def _usable_histories(
    catalog: ItemCatalog,
    histories: Sequence[UserHistory],
    tasks: Sequence[str],
    source: str | Path = "sequential_data.txt",
) -> list[UserHistory]:
    """The histories of 2+ items, all in the catalog; none at all is an error naming `source`
    (the history file) when a history task is asked for (a one-item history has no item
    before its target)."""
    known = [h for h in histories if all(i in catalog.position for i in h.items)]
    usable = [h for h in known if len(h.items) >= 2]
    if len(usable) < len(known):
        logger.warning(
            "%d users with a single item left out (a history task needs 2+ items)",
            len(known) - len(usable),
        )
    wanted = [t for t in tasks if t in HISTORY_TASKS]
    if wanted and not usable:
        raise ValueError(
            f"no user history of 2+ items ({source} missing, empty or one-item "
            f"users only): the tasks {', '.join(wanted)} need them; --tasks "
            f"{' '.join(t for t in TASKS if t not in HISTORY_TASKS)} builds the others"
        )
    return usable


def _contexts(
    catalog: ItemCatalog,
    histories: Sequence[UserHistory],
    config: BuildConfig,
    source: str | Path = "sequential_data.txt",
) -> tuple[TaskContext, TaskContext]:
    known = _usable_histories(catalog, histories, config.tasks, source)
    train = [h for h in known if not in_test(h.user_id, config.test_fraction, config.seed)]
    test = [h for h in known if in_test(h.user_id, config.test_fraction, config.seed)]
    cooc = cooccurrence(train)

    def pool(is_test: bool) -> dict[str, list[tuple[str, float]]]:
        return {
            k: v
            for k, v in cooc.items()
            if in_test(k, config.test_fraction, config.seed) == is_test
        }

    common = dict(
        max_history=config.max_history,
        max_targets=config.max_targets,
        n_negatives=config.n_negatives,
    )
    logger.info("users: %d train, %d test", len(train), len(test))
    return (
        TaskContext(catalog, train, pool(False), split="train", **common),
        TaskContext(catalog, test, pool(True), split="test", **common),
    )


Rewrite = Callable[[list[ItemQuery]], list[ItemQuery]]


def build_queries(
    catalog: ItemCatalog,
    histories: Sequence[UserHistory],
    config: BuildConfig,
    rewrite: Rewrite | None = None,
    history_file: str | Path = "sequential_data.txt",
) -> tuple[dict[str, list[ItemQuery]], dict[str, list[ItemQuery]]]:
    """Training and test queries per task (test queries seen in training removed).

    Args:
        catalog: The items.
        histories: All users (split here).
        config: What to build.
        rewrite: Applied to each task's generated queries (e.g. LLM paraphrasing) before the
            test queries seen in training are removed.
        history_file: Where the histories came from (named when none is usable).

    Returns:
        (train, test): task -> queries; a task of which no query could be drawn is warned of.
    """
    train_ctx, test_ctx = _contexts(catalog, histories, config, history_file)
    train: dict[str, list[ItemQuery]] = {}
    test: dict[str, list[ItemQuery]] = {}
    for task in tqdm(config.tasks, desc="item tasks"):
        n = config.train_per_task * (config.behaviour_boost if task in ("UH2I", "I2I") else 1)
        train[task] = generate(task, train_ctx, n, seed=config.seed)
        drawn = generate(task, test_ctx, config.test_per_task, seed=config.seed + 1)
        if rewrite is not None:
            train[task], drawn = rewrite(train[task]), rewrite(drawn)
        seen = {_norm(q.query) for q in train[task]}
        test[task] = [q for q in drawn if _norm(q.query) not in seen]
        logger.info(
            "%s: %d train, %d test (%d seen in training dropped)",
            task,
            len(train[task]),
            len(test[task]),
            len(drawn) - len(test[task]),
        )
        empty = [name for name, qs in (("training", train[task]), ("test", test[task])) if not qs]
        if empty:
            logger.warning(
                "%s: no %s query could be drawn from this catalog (too few items share its "
                "values, or too few fail them to give %d negatives)",
                task,
                " or ".join(empty),
                config.n_negatives,
            )
    return train, test


def _norm(text: str) -> str:
    return " ".join(text.casefold().split())


def training_record(q: ItemQuery, catalog: ItemCatalog, qid: str) -> dict[str, Any]:
    """One training example in the project's JSONL (a one-turn session, item texts)."""

    def passage(item_id: str) -> dict[str, str]:
        item = catalog.item(item_id)
        return {"id": item_id, "title": item.title, "text": catalog.render(item)}

    return {
        "id": qid,
        "messages": [{"role": "user", "content": q.query}],
        "positives": [passage(i) for i in q.positives[:MAX_TRAIN_POSITIVES]],
        "negatives": [passage(i) for i in q.negatives],
        "source": f"items/{q.task}",
        "metadata": {
            "task": q.task,
            "template": q.template,
            "relevant": list(q.positives),
            "constraints": [c.to_dict() for c in q.constraints],
        },
    }


def test_session(q: ItemQuery, qid: str) -> Session:
    """A test query as a one-turn session; its mask and constraints in the metadata."""
    meta = {
        "task": q.task,
        "exclude": list(q.exclude),
        "constraints": [c.to_dict() for c in q.constraints],
        "template": q.template,
    }
    return Session(id=qid, turns=(Turn("user", q.query),), metadata=meta)


RENAMED_ID = "metadata_id"  # where the catalog keeps an item's own metadata field `id`


def write_catalog(path: str | Path, items: Sequence[Passage]) -> int:
    """The catalog as JSONL: {"id", "title", <metadata>} per item.

    The catalog id (the item's row) always wins: a metadata field named `id` (a domain's own
    id, e.g. "app-1000") is written as `metadata_id` and `read_catalog` gives it back as `id`.
    A metadata field `title` is the item's title already and is left out; an item holding both
    `id` and `metadata_id` fields is refused (the one could not be told from the other).
    """

    def row(p: Passage) -> dict[str, Any]:
        meta = {k: v for k, v in p.metadata.items() if k not in ("id", "title")}
        if "id" in p.metadata:
            if RENAMED_ID in p.metadata:
                raise ValueError(
                    f"item {p.id!r} has metadata fields 'id' and {RENAMED_ID!r}: the catalog "
                    f"keeps a metadata 'id' as {RENAMED_ID!r}; rename one of them"
                )
            meta[RENAMED_ID] = p.metadata["id"]
        return {"id": p.id, "title": p.title, **meta}

    return write_jsonl(path, (row(p) for p in items))


def read_catalog(path: str | Path, schema: CatalogSchema = STEAM_SCHEMA) -> list[Passage]:
    """Items written by `write_catalog` (text = `render_item` with `schema`); a repeated id
    raises."""
    out, seen = [], set()
    for lineno, obj in iter_jsonl(path):
        pid = require_id(obj, "id", path, lineno)
        title = require(obj, "title", path, lineno)
        if pid in seen:
            raise DataFormatError(path, f"duplicate id {pid!r}", lineno, "id")
        seen.add(pid)
        meta = {k: v for k, v in obj.items() if k not in ("id", "title", RENAMED_ID)}
        if RENAMED_ID in obj:
            meta["id"] = obj[RENAMED_ID]
        p = Passage(id=pid, text="", title=title, metadata=meta)
        out.append(Passage(id=pid, text=render_item(p, schema), title=title, metadata=meta))
    return out


def build_items(
    data: RecLMData,
    out_dir: str | Path,
    config: BuildConfig,
    rewrite: Rewrite | None = None,
    schema: CatalogSchema = STEAM_SCHEMA,
) -> dict[str, Any]:
    """Generate every task's training and test queries and write them (see the module doc).

    Args:
        data: The domain's items and histories (`io.reclm.load_reclm`).
        out_dir: The output directory.
        config: What to build.
        rewrite: Optional rewriting of generated queries (`paraphrase.paraphrase_queries`).
        schema: What the items' fields are (default: Steam's).

    Returns:
        The counts per built task and the skipped tasks with the reason (also saved in
        build_config.json).
    """
    out = Path(out_dir)
    items = subsample_catalog(data, config.catalog_size, config.seed)
    for problem, values in unusable_values(items, schema).items():
        logger.warning("%d of %d items: %s (e.g. %r)", len(values), len(items), problem, values[0])
    catalog = ItemCatalog(items, schema)
    parsed = {"price": bool((catalog.prices == catalog.prices).any()), "date": any(catalog.dates)}
    tasks, skipped = plan_tasks(schema, catalog.has_values(), parsed, config.tasks)
    plan = dataclasses.replace(config, tasks=tasks)
    source = data.histories_file or "sequential_data.txt"
    train, test = build_queries(catalog, data.histories, plan, rewrite, source)
    write_catalog(out / CATALOG_FILE, items)
    save_schema(out / SCHEMA_FILE, schema)
    records = [
        training_record(q, catalog, f"{task}-train-{i:05d}")
        for task, qs in train.items()
        for i, q in enumerate(qs)
    ]
    random.Random(config.seed).shuffle(records)
    write_jsonl(out / TRAIN_FILE, records)
    sessions, qrels = [], []
    for task, qs in test.items():
        for i, q in enumerate(qs):
            qid = f"{task}-{i:05d}"
            sessions.append(test_session(q, qid))
            qrels += [Qrel(qid, pid, 1) for pid in q.positives]
    write_sessions(out / QUERIES_FILE, sessions)
    write_qrels(out / QRELS_FILE, qrels)
    counts = {
        "catalog": len(items),
        "train": {t: len(v) for t, v in train.items()},
        "test": {t: len(v) for t, v in test.items()},
        "skipped": skipped,
    }
    with atomic_write(out / CONFIG_FILE) as f:
        json.dump({"config": asdict(config), "counts": counts}, f, indent=2)
    return counts
