"""Robustness evaluation of conversational retrievers (ChatRetriever paper, section 4.3).

prompts.py (the three prompt templates and their reply parsers), generation.py (the cached,
seeded, batched LLM with bounded retries), hf_generator.py (the Hugging Face chat model it
drives: batched generation, option scoring, lazy loading), sampling.py (per-item random streams,
so a sampled reply does not depend on its batch), conversations.py (per-turn sessions ->
conversations), partial.py (partial response modification, online), full.py (full context
modification), evaluation.py (nDCG@3, Diff, Mean and SD per system; the modified datasets as
sessions JSONL).
"""
