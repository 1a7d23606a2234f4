"""The ChatRetriever (CSIT): a chat LLM whose last [EMB_t] hidden state embeds sessions and
passages, trained with contrastive + session-masked instruction tuning.

The machinery (loading, saving, the one-pass CSIT forward, fast encoding) is the shared
`modeling.emb_llm.EmbLLM`; a saved ChatRetriever is a directory with `chatretriever.json`.
"""

from __future__ import annotations

from chatretriever.modeling.emb_llm import EmbLLM

SAVED_CONFIG = "chatretriever.json"


class ChatRetriever(EmbLLM):
    """Encodes sessions and passages with a chat LLM (implements `encoders.Encoder`).

    Build with `ChatRetriever.from_pretrained(base model or saved dir)`. Attributes: `model` (the
    causal LM, peft-wrapped under LoRA), `tokenizer`, `template` (RetrievalTemplate), `config`,
    `lora`, `name`, `dim`, `normalize`, `padding_side`, `fingerprint` and `base_fingerprint`.
    """

    SAVED_CONFIG = SAVED_CONFIG
    NAME_PREFIX = "chatretriever"
