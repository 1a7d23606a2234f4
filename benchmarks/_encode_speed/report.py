"""The markdown table of `encode_speed.py` and the targets it reports against."""

from __future__ import annotations

TARGET_SPEEDUP = 2.5
TARGET_COSINE = 0.999
REFERENCE = "fast-fp32"  # equals the training forward in fp32 (tests/test_fast_encode.py)
TARGET_TOKENS_PER_S = 3000  # bf16-native CPU, 2 cores
TARGET_COSINE_MEAN = 0.9999
TARGET_FP32_SPEEDUP = 1.5  # a CPU without native bf16: best fp32 row vs v1-fp32


def markdown(result: dict) -> str:
    a, env = result["encoders"], result["environment"]
    lines = [
        "# Encoding and search speed",
        "",
        f"CPU {env.get('cpu_model') or '-'}; "
        f"device {a['device']}, torch threads {env['torch_threads']} of {env['cpu_count']} CPUs, "
        f"load average at start {env['loadavg_1_5_15']} "
        f"(other processes busy: {env['other_processes_busy']}); faiss threads "
        f"{result.get('faiss_threads', '-')}; CPU with native bf16 (AMX / AVX512-BF16): "
        f"{env.get('cpu_native_bf16', '-')}.",
        "",
        f"## (a) {a['n_passages']} MTRAG passages ({a['n_tokens']:,} tokens, "
        f"{a['tokens_mean']:.0f} on average, max {a['tokens_max']}), {a['model']}, "
        f"{a['hardware']}",
        "",
        "| row | encoder path | dtype | compiled | tokens/s | passages/s | seconds | warm-up s "
        "| x v1-autocast | cosine min | cosine mean |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in a["rows"]:
        dtype = r["dtype"]
        if dtype == "bfloat16" and r.get("fp32_layers"):
            dtype += f" (first {r['fp32_layers']} fp32)"
        lines.append(
            f"| {r['row']} | {r['what']} | {dtype} | {r['compiled']} | {r['tokens_per_s']:.0f} | "
            f"{r['passages_per_s']:.1f} | {r['seconds']:.1f} | {r['warmup_s']:.1f} | "
            f"{_ratio(r)} | {r['cosine_min']:.5f} | "
            f"{r['cosine_mean']:.6f} |"
        )
    if any(_ratio(r) == "-" for r in a["rows"]):
        lines += ["", "x v1-autocast: - where that row was not run (name it in --rows)."]
    converted = [r for r in a["rows"] if "convert_s" in r]
    if converted:
        lines += ["", "Other runtimes, conversion + compile (in the warm-up, not in tokens/s): "]
        lines[-1] += "; ".join(
            f"{r['row']} {r['convert_s']:.1f} s + {r['compile_s']:.1f} s ({r['runtime']}, "
            f"{r['runtime_threads']} threads)"
            for r in converted
        )
    lines += [
        "",
        f"Tokenization of all passages: {a['tokenize_s']:.2f} s (batched fast tokenizer). "
        f"Cosine against `{REFERENCE}` (equal to the fp32 training forward). Best row at "
        f"cosine min >= {TARGET_COSINE} and mean >= {TARGET_COSINE_MEAN}: {a['best_row']} "
        f"({a['best_tokens_per_s']} tokens/s; target >= {TARGET_TOKENS_PER_S} on a bf16-native "
        f"CPU: {a['meets_bf16_target']}); fp32 gain over v1-fp32: {a.get('fp32_speedup', '-')} "
        f"(target >= {TARGET_FP32_SPEEDUP} on a CPU without native bf16).",
    ]
    if result["faiss"]:
        lines += [
            "",
            "## (b) Faiss, top 10, inner product",
            "",
            "| vectors | n | dim | kind | index | build s | queries/s | recall@10 vs exact |",
            "|---|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['vectors']} | {r['n']:,} | {r['dim']} | {r['kind']} | {r['index']} | "
            f"{r['build_s']:.2f} | {r['queries_per_s']:.1f} | {r['recall_at_10']:.4f} |"
            for r in result["faiss"]
        ]
    lines += ["", f"`{result['command']}`", ""]
    return "\n".join(lines)


def _ratio(row: dict) -> str:
    """The speed-up against v1-autocast, "-" when that row was not run (name it in --rows)."""
    ratio = row.get("speedup_vs_v1-autocast")
    return "-" if ratio is None else f"{ratio:.2f}"
