"""Helper modules of benchmarks/conversational.py (the MTRAG-UN benchmark), by concern.

    systems   which systems to run: families, query formulations, `--model` names, skips
    tasks     which tasks to evaluate: `--eval-conversations` files and the task subset
    backends  models and dense search: loading encoders, the rewriting LLM, the numpy index
    runs      the cached, resumable runs: shared workspace, settings keys, run files
    report    evaluation against the best BM25 run, and the JSON / markdown / PNG results
    pool      the pooled corpus of `--pool` (judged passages + BM25's top P), shared with rag.py
    script    the scripts' shared ending: input errors as one `error: ...` line

The script puts benchmarks/ on sys.path, so these import as `_conversational.<module>`.
"""
