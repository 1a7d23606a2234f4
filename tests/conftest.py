"""Shared fixtures: a locally built tokenizer with a chat template and tiny random causal LMs.

No network, no GPU: everything is built from a config in a few hundred milliseconds.
"""

from __future__ import annotations

from pathlib import Path

import pytest

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_TRAIN_TEXT = [
    "what is the capital of france? paris is the capital of france.",
    "how do i reset my password in the cloud console? open settings and choose reset.",
    "the quick brown fox jumps over the lazy dog 0123456789",
    "tell me more about it. which one is cheaper? and what about the second one?",
]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def build_tokenizer():
    """A byte-level BPE tokenizer (any text encodes) with a chatml template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_TRAIN_TEXT * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_model(arch: str, vocab_size: int, seed: int = 0):
    """A 2-layer random causal LM of the given architecture ("llama" or "qwen2")."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    common = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    config = LlamaConfig(**common) if arch == "llama" else Qwen2Config(**common)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


def _save_tiny(root: Path, arch: str) -> Path:
    tok = build_tokenizer()
    model = build_tiny_model(arch, len(tok))
    out = root / f"tiny-{arch}"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A saved tiny random Llama with its tokenizer (a local Hugging Face directory)."""
    return _save_tiny(tmp_path_factory.mktemp("models"), "llama")


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory) -> Path:
    """A saved tiny random Qwen2 with its tokenizer (a local Hugging Face directory)."""
    return _save_tiny(tmp_path_factory.mktemp("models"), "qwen2")


@pytest.fixture(params=["llama", "qwen2"])
def tiny_model_dir(request, tiny_llama_dir, tiny_qwen2_dir) -> Path:
    """Each tiny architecture in turn."""
    return tiny_llama_dir if request.param == "llama" else tiny_qwen2_dir


SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real public data beside the checkout; tests that need it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA


@pytest.fixture()
def tok():
    """The tiny tokenizer with 3 EMB tokens added (the retrieval template's tests)."""
    from chatretriever.modeling.template import add_emb_tokens

    t = build_tokenizer()
    add_emb_tokens(t, 3)
    return t


def retrieval_template(tok, **kw):
    """A RetrievalTemplate with 3 EMB tokens and roomy budgets, `kw` overriding them."""
    from chatretriever.modeling.template import RetrievalTemplate

    args = dict(n_emb_tokens=3, max_session_len=512, max_passage_len=256, max_response_len=256)
    args.update(kw)
    return RetrievalTemplate(tok, **args)


def chat_messages(*pairs: tuple[str, str]) -> list[dict[str, str]]:
    """[(role, content), ...] as chat messages."""
    return [{"role": r, "content": c} for r, c in pairs]


def build_tiny_bert(words):
    """A random 2-layer BERT (hidden 32) and a word-level tokenizer over `words` (plus "##s"):
    a sentence embedder's body, built offline. Returns (model in eval mode, tokenizer)."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *dict.fromkeys(words), "##s"]
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(vocab)})
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return BertModel(config, add_pooling_layer=False).eval(), tokenizer
