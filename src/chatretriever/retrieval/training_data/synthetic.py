"""Synthetic ad-hoc search pairs for any corpus (InPars / GPL style domain adaptation).

A local chat LLM writes one search question for each sampled passage; a pair is kept only when
the reply looks like a question (`plausible_question`) and its passage ranks in BM25's top k for
it (a question BM25 cannot tie back to its passage is usually vague or off-topic). Hard
negatives are then mined as for every other source (`negatives.mine_hard_negatives`, from a rank
window). Questions are cached in a JSONL file keyed by (model and its weight fingerprint, prompt,
passage), appended to as they are made, so a rerun costs nothing and a model retrained in place
writes new ones; decoding is greedy and the passage sample a hash of (seed, passage id), so the
output is deterministic.

    chatretriever build-train synthetic CORPUS --n 2000 --model smollm2-135m-instruct --out F
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from chatretriever.io.training import TrainingExample, TrainingPassage
from chatretriever.retrieval.bm25 import BM25Config, BM25Retriever
from chatretriever.retrieval.rewrite import RewriteCache, clean_rewrite
from chatretriever.types import Passage, Turn, passage_text

logger = logging.getLogger(__name__)

# Chat messages of several prompts -> one reply each (greedy).
BatchGenerator = Callable[[list[list[dict[str, str]]]], list[str]]


@dataclass(frozen=True)
class SyntheticConfig:
    """How synthetic pairs are made.

    Attributes:
        n: Pairs to keep.
        model: The chat LLM (part of the cache key and the examples' metadata).
        model_fingerprint: The LLM's weight fingerprint (`fingerprint.model_fingerprint`), part
            of the cache key so a model retrained under the same name or directory never reuses
            the old model's questions; None: the name alone keys the model.
        seed: Seeds the passage sample.
        top_k: Keep a pair when its passage is among BM25's top k for its question.
        min_words: Passages with fewer words are not sampled (titles, stubs).
        max_passage_chars: The passage is cut to this many characters in the prompt.
        batch_size: Prompts per generator call.
        system: System message of the prompt.
        template: User message; `{passage}` is filled in.
    """

    n: int
    model: str = "smollm2-135m-instruct"
    model_fingerprint: str | None = None
    seed: int = 0
    top_k: int = 20
    min_words: int = 20
    max_passage_chars: int = 1000
    batch_size: int = 8
    system: str = "You are a helpful AI assistant."
    template: str = (
        "{passage}\n\nWrite one short search question that this passage answers. "
        "Answer with the question only."
    )

    def __post_init__(self) -> None:
        for name in ("n", "top_k", "batch_size"):
            if getattr(self, name) < 1:  # the CLI flags: --n, --top-k, --generate-batch-size
                raise ValueError(f"synthetic: {name} must be at least 1, got {getattr(self, name)}")

    @property
    def prompt_hash(self) -> str:
        raw = json.dumps([self.system, self.template, self.max_passage_chars]).encode("utf-8")
        return hashlib.sha256(raw).hexdigest()[:12]


def sample_order(passages: Sequence[Passage], seed: int, min_words: int) -> list[Passage]:
    """Passages with at least `min_words` words, ordered by a hash of (seed, id): the same
    passages come first whatever the corpus order, and a larger n extends a smaller one. Of
    passages with the same text (whitespace and case aside) only the first in that order is kept:
    two examples with one positive text would be each other's false in-batch negatives."""

    def rank(p: Passage) -> bytes:
        return hashlib.sha256(f"{seed}\x1f{p.id}".encode()).digest()

    seen: set[str] = set()
    out = []
    for p in sorted((p for p in passages if len(p.text.split()) >= min_words), key=rank):
        norm = " ".join(p.text.split()).casefold()  # as mining tells duplicates apart
        if norm not in seen:
            seen.add(norm)
            out.append(p)
    return out


def question_messages(passage: Passage, config: SyntheticConfig) -> list[dict[str, str]]:
    """The chat messages that ask for a search question about a passage."""
    text = " ".join(passage_text(passage).split())[: config.max_passage_chars]
    user = config.template.format(passage=text)
    return [{"role": "system", "content": config.system}, {"role": "user", "content": user}]


_META = re.compile(r"\b(this|the) (passage|question|text|article)\b", re.IGNORECASE)


def plausible_question(text: str, max_words: int = 30) -> bool:
    """Whether a reply looks like a search question: it asks (has a "?"), has 3 to `max_words`
    words and does not talk about the prompt ("What is the answer to this question?", "This
    passage explains ...": small LLMs write these often)."""
    n = len(text.split())
    return "?" in text and 3 <= n <= max_words and not _META.search(text)


def _key(passage: Passage, config: SyntheticConfig) -> str:
    fp = [] if config.model_fingerprint is None else [config.model_fingerprint]
    raw = json.dumps([config.model, *fp, config.prompt_hash, passage.id, passage_text(passage)])
    return hashlib.sha256(raw.encode("utf-8")).hexdigest()


def _questions(
    batch: list[Passage], generate: BatchGenerator, cache: RewriteCache, config: SyntheticConfig
) -> list[str]:
    """Questions of a batch: cached ones read, the others generated in one call and cached.
    (The cache rows are the rewrite cache's: the question is stored in its "rewrite" field.)"""
    keys = [_key(p, config) for p in batch]
    todo = [i for i, k in enumerate(keys) if cache.get(k) is None]
    if todo:
        replies = generate([question_messages(batch[i], config) for i in todo])
        for i, reply in zip(todo, replies, strict=True):
            row = {"id": batch[i].id, "model": config.model, "prompt": config.prompt_hash}
            cache.put(keys[i], {**row, "rewrite": clean_rewrite(reply)})
    return [cache.get(k) or "" for k in keys]


def synthetic_examples(
    corpus: Sequence[Passage],
    generate: BatchGenerator,
    config: SyntheticConfig,
    cache_path: str | Path | None = None,
    bm25: BM25Config | None = None,
    show_progress: bool = True,
    corpus_name: str = "corpus",
) -> list[TrainingExample]:
    """Up to `config.n` (question, passage) examples that pass the BM25 filter.

    Args:
        corpus: The passages (the BM25 filter searches all of them).
        generate: Prompts -> replies (`hf_batch_generator`, or a fake in tests).
        config: The settings.
        cache_path: The question cache (plain JSONL, appended to); None: memory only.
        bm25: The BM25 settings of the filter (default: the package's one).
        show_progress: Show a progress bar.
        corpus_name: What errors and warnings call the corpus (its file).

    Returns:
        One-turn examples (id "synthetic-<passage id>", source "synthetic", metadata with the
        model, the prompt hash and the passage's BM25 rank), without negatives.

    Raises:
        ValueError: The corpus has no passage of `config.min_words` words.
    """
    order = sample_order(corpus, config.seed, config.min_words)
    if not order:  # before BM25, which fails obscurely on a blank corpus
        raise ValueError(
            f"{corpus_name}: none of its {len(corpus)} passages has at least {config.min_words} "
            "words of text: no passage to write a question about"
        )
    retriever = BM25Retriever(corpus, bm25, show_progress=show_progress)
    position = {p.id: i for i, p in enumerate(corpus)}
    cache = RewriteCache(cache_path)
    out: list[TrainingExample] = []
    tried = 0
    bar = tqdm(total=config.n, desc="synthetic pairs", disable=not show_progress)
    try:
        for start in range(0, len(order), config.batch_size):
            batch = order[start : start + config.batch_size]
            questions = _questions(batch, generate, cache, config)
            hits = retriever.top_k([q or "-" for q in questions], config.top_k)
            for p, q, row in zip(batch, questions, hits, strict=True):
                tried += 1
                ranks = [i for i, _ in row]
                if not plausible_question(q) or position[p.id] not in ranks or len(out) >= config.n:
                    continue
                meta = {"model": config.model, "prompt": config.prompt_hash}
                meta["bm25_rank"] = ranks.index(position[p.id]) + 1
                pos = (TrainingPassage.from_passage(p),)
                msgs = (Turn("user", q),)
                out.append(
                    TrainingExample(f"synthetic-{p.id}", msgs, pos, (), None, "synthetic", meta)
                )
                bar.update(1)
            if len(out) >= config.n:
                break
    finally:
        cache.close()
        bar.close()
    logger.info(
        "synthetic: kept %d of %d generated questions (BM25 top %d)", len(out), tried, config.top_k
    )
    if len(out) < config.n:
        logger.warning(
            "%s: %d synthetic pairs, fewer than n=%d: every one of its %d distinct passages of "
            "at least %d words was tried",
            corpus_name,
            len(out),
            config.n,
            len(order),
            config.min_words,
        )
    return out


def hf_batch_generator(
    model_name: str, max_new_tokens: int = 48, device: str | None = None
) -> BatchGenerator:
    """A greedy batched chat generator (left padding) over `load_backbone(kind="causal")`.

    Args:
        model_name: A built-in chat model name, a local model directory or a `.gguf` file.
        max_new_tokens: The most tokens of one reply.
        device: Where to run; default the current accelerator, else the CPU.

    Returns:
        A list of chats -> their replies, without special tokens.
    """
    import torch

    from chatretriever.modeling.backbones import default_device, load_backbone

    model, tokenizer = load_backbone(model_name, kind="causal")
    model.to(default_device() if device is None else device)
    tokenizer.padding_side = "left"  # generation continues every row from its last token
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token

    def generate(chats: list[list[dict[str, str]]]) -> list[str]:
        texts = [
            tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False)
            for c in chats
        ]
        enc = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(
                **enc.to(model.device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
        new = out[:, enc["input_ids"].shape[1] :]  # (B, T_new)
        return [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]

    return generate


def synthetic_settings(config: SyntheticConfig) -> dict[str, object]:
    """The resolved settings to record beside the output."""
    return {**dataclasses.asdict(config), "prompt_hash": config.prompt_hash}
