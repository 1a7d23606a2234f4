"""Robustness evaluation of conversational retrievers (ChatRetriever paper, section 4.3).

prompts.py (the three prompt templates and their reply parsers), generation.py (the cached,
seeded, batched LLM with bounded retries), conversations.py (per-turn sessions -> conversations),
partial.py (partial response modification, online), full.py (full context modification),
evaluation.py (nDCG@3, Diff, Mean and SD per system; the modified datasets as sessions JSONL).
"""
