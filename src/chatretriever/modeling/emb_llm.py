"""A chat LLM whose pooled token's hidden state (the last [EMB_t], or the end-of-sequence token
under `pooling: eos`) embeds sessions and passages: the machinery every
LLM-embedder method shares (ChatRetriever, UniConv): loading, saving, identity, the training
forwards (plain and one-pass CSIT); encoding (the fast path) is its mixin `emb_encode.EmbEncoding`.

The saved directory format (reading and writing model dirs) lives in `emb_llm_io`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.nn.functional as F

from chatretriever.config import LoraSettings, RetrieverConfig
from chatretriever.modeling import emb_llm_io
from chatretriever.modeling.adapters import adapter_state, is_peft
from chatretriever.modeling.backbones import checked_device, context_length
from chatretriever.modeling.collate import csit_mask, last_token_positions
from chatretriever.modeling.emb_encode import EmbEncoding
from chatretriever.modeling.fast_encode import EncodeBody, FastEncodeSettings, InferenceBody
from chatretriever.modeling.fingerprint import digest, tensors_fingerprint
from chatretriever.modeling.losses import IGNORE_INDEX
from chatretriever.modeling.precision import keep_fp32, resolve_dtype
from chatretriever.modeling.sources import builtin_retriever_dir
from chatretriever.modeling.template import RetrievalTemplate

logger = logging.getLogger(__name__)

FINGERPRINT_VERSION = 1  # bump when what the fingerprint covers changes
# Left out of the fingerprint: where the base lives (its weights are fingerprinted), loader
# flags, a training-only length, and the dtype settings (the resolved dtype is used instead).
_NOT_FINGERPRINTED = ("base_model", "trust_remote_code", "max_response_len", "dtype", "fp32_layers")


_E = TypeVar("_E", bound="EmbLLM")


def lora_identity(lora: LoraSettings) -> dict[str, Any]:
    """The LoRA settings a fingerprint covers (dropout does not change what a trained model
    computes)."""
    return {k: v for k, v in lora.to_dict().items() if k != "dropout"}


def _warn_past_context(model: Any, config: RetrieverConfig, name: str) -> None:
    """Warn when a length budget passes the backbone's context: learned positions (GPT-2) then
    fail on a long input, rotary ones (Llama, Qwen) read positions they were never trained on.
    A training row holds a session and its response (`max_session_len + max_response_len`)."""
    ctx = context_length(model)
    budgets = {
        "max_session_len + max_response_len": config.max_session_len + config.max_response_len,
        "max_passage_len": config.max_passage_len,
    }
    over = [f"{what} = {n}" for what, n in budgets.items() if ctx is not None and n > ctx]
    if over:
        logger.warning(
            "%s: %s over the model's context of %d positions: long inputs will fail or degrade; "
            "lower them (--set retriever.max_...)",
            name,
            ", ".join(over),
            ctx,
        )


class EmbLLM(EmbEncoding, torch.nn.Module):
    """Encodes sessions and passages with a chat LLM (implements `encoders.Encoder`).

    A method subclasses it and names its saved config (`SAVED_CONFIG`) and its models
    (`NAME_PREFIX`). Build with `from_pretrained`.

    Attributes: `model` (the causal LM, peft-wrapped under LoRA),
    `tokenizer`, `template` (RetrievalTemplate), `config`, `lora`, `name`, `dim`, `normalize`,
    `padding_side` ("right" or "left": pooling is correct with either), `fingerprint` (what the
    model is, by content) and `base_fingerprint` (its base model's weights, None if unknown).
    """

    SAVED_CONFIG = "emb_llm.json"
    NAME_PREFIX = "emb-llm"
    # Saved configs of OTHER methods on this same body whose directories this class can start
    # from (a recipe continuing another method's model); its own SAVED_CONFIG is tried first.
    CONTINUES_FROM: tuple[str, ...] = ()
    # The template keeps an over-long current turn's END: a query joined from several turns
    # must end with the question, oldest turns first (`search.joins_newest_first` reads this).
    keeps_text_end: bool = True

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        config: RetrieverConfig,
        lora: LoraSettings,
        name: str,
        base_fingerprint: str | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.lora = lora
        self.template = RetrievalTemplate.from_config(tokenizer, config)
        self.emb_ids = self.template.emb_ids
        self.name = name
        self.dim = int(model.config.get_text_config().hidden_size)
        self.normalize = config.normalize
        self.padding_side = "right"
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else (tokenizer.eos_token_id or 0))
        self._fp32_hooks: list[Any] = []
        self._fp32_layers = 0
        self.base_fingerprint = base_fingerprint
        self._weights_fp: tuple[tuple, str] | None = None  # (tensor versions, digest)
        # a merged save's record of the adapter it was merged from (`emb_llm_io`): its identity
        self.merged_from: dict[str, Any] | None = None
        # The inference fast path (`fast_encode`): settings (None = the device's defaults), the
        # inference copy with the key it was made for, and tokens encoded (for compile="auto").
        self.encode_settings: FastEncodeSettings | None = None
        self._inference: tuple[tuple, InferenceBody] | None = None
        self._runtime_body: tuple[tuple, EncodeBody] | None = None  # runtime != "torch"
        self._tokens_encoded = 0
        _warn_past_context(model, config, name)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls: type[_E],
        name_or_dir: str | Path,
        *,
        config: RetrieverConfig | None = None,
        lora: LoraSettings | None = None,
        is_trainable: bool = False,
        device: str | torch.device | None = None,
        **overrides: Any,
    ) -> _E:
        """A new model from a base chat LLM, or a saved directory (holding `SAVED_CONFIG`, or
        one of `CONTINUES_FROM`: another method's model on the same body, to train on from).

        Args:
            name_or_dir: Base model (built-in name, HF dir, .gguf) or a `save_pretrained` dir.
            config: Settings of a NEW retriever (its base_model is replaced by name_or_dir). With
                a saved dir (a recipe continuing from it), the fields its weights depend on
                (`saved.WEIGHT_FIELDS`) must equal the saved ones and the others (lengths, dtype,
                system prompt, ...) replace them; base_model stays the saved one.
            lora: LoRA of a new retriever (default LoraSettings(); enabled=False = full FT).
                With a saved dir, `enabled` and `saved.LORA_WEIGHT_FIELDS` must equal the saved
                ones; dropout follows `lora`.
            is_trainable: For a saved adapter: load it trainable (to continue training).
            device: Where to put the model; default the current accelerator, else CPU.
            **overrides: RetrieverConfig fields to change (e.g. dtype="fp32", max_session_len,
                base_model to relocate the base of a saved adapter). `saved.WEIGHT_FIELDS` of a
                saved retriever cannot change.

        Returns:
            The model (an instance of the class it is called on).

        Raises:
            ValueError: Settings that contradict a saved retriever's weights (naming the field),
                or a saved adapter whose base model has other weights than the one it was
                trained on.
        """
        target = checked_device(device)  # before minutes of loading
        path = Path(name_or_dir)
        path = builtin_retriever_dir(name_or_dir) or path
        saved = [n for n in (cls.SAVED_CONFIG, *cls.CONTINUES_FROM) if (path / n).is_file()]
        if saved:
            retriever = emb_llm_io.load_saved(
                cls, path, is_trainable, overrides, config, lora, config_file=saved[0]
            )
        else:
            emb_llm_io.refuse_other_saved(cls, path)
            base = str(path.resolve()) if path.exists() else str(name_or_dir)
            retriever = emb_llm_io.load_new(cls, base, config, lora, overrides)
        return retriever.to(target)

    def save_pretrained(self, directory: str | Path, merged: bool = False) -> Path:
        """Save weights (safetensors), tokenizer and the resolved config.

        The files are written into a staging directory and moved in once all are complete
        (`atomic_files`, SAVED_CONFIG last): an interrupted save leaves the previous one intact,
        and the directory's other entries (a training run's checkpoints, recipe and log) are
        kept. Weight files a previous save (in another format) left are removed.

        Args:
            directory: Output directory (created).
            merged: Under LoRA, merge the adapter (and EMB rows) into full weights instead of
                saving the small adapter (a new fingerprint: see `fingerprint`). Full
                fine-tuning always saves the whole model.

        Returns:
            The directory.
        """
        target = Path(directory)
        fmt = emb_llm_io.save_retriever(self, target, merged)
        logger.info("saved %s (%s) to %s", type(self).__name__, fmt, target)
        return target

    def load_trainable_state(self, directory: str | Path) -> None:
        """Load the weights a `save_pretrained` dir holds into this model, in place (resume).

        Under LoRA that is the adapter and the EMB rows; under full fine-tuning the whole model.
        """
        emb_llm_io.load_trained_weights(self.model, Path(directory))

    # ------------------------------------------------------------------ identity
    @property
    def fingerprint(self) -> str:
        """A short hex content hash of what this retriever computes (`encoders.Encoder`).

        Covers the resolved config (less where the base lives and training-only fields), the
        LoRA shape, the chat template and EMB ids, the trained weights (`weights_fingerprint`),
        the compute dtype (with fp32_layers under bf16) and the base model's weight fingerprint.
        Two models saved under one name differ; the same model re-saved or copied does not,
        and neither does its merged save (`save_pretrained(merged=True)`: the same function in
        full weights, which the fast path computes with anyway): it records the adapter's
        weights and LoRA shape, and while its full weights are the ones it saved, they stand
        for them, so indexes built with the adapter form take its queries and vice versa.
        """
        cfg = {k: v for k, v in self.config.to_dict().items() if k not in _NOT_FINGERPRINTED}
        if self.config.pooling == "eos":  # no new token row: its initialisation is unused
            cfg.pop("emb_init")
        bf16 = self.compute_dtype == torch.bfloat16
        lora, weights = None, self.weights_fingerprint()
        if is_peft(self.model):  # dropout does not change what a trained model computes
            lora = lora_identity(self.lora)
        elif self.merged_from and weights == self.merged_from.get("merged_weights"):
            lora, weights = self.merged_from["lora"], self.merged_from["weights"]
        return digest(
            FINGERPRINT_VERSION,
            {
                "config": cfg,
                "lora": lora,
                "dtype": "bf16" if bf16 else "fp32",
                "fp32_layers": self.config.fp32_layers if bf16 else 0,
                "chat_template": self.tokenizer.chat_template,
                "vocab": len(self.tokenizer),
                "emb_ids": list(self.emb_ids),
                "base": self.base_fingerprint,
                "weights": weights,
            },
        )

    def merged_identity(self, merged_state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        """What a merged save records to keep this (adapter) model's identity: its LoRA shape
        and adapter weights, and the fingerprint of the merged weights they stand for."""
        return {
            "lora": lora_identity(self.lora),
            "weights": self.weights_fingerprint(),
            "merged_weights": tensors_fingerprint(merged_state),
        }

    def weights_fingerprint(self) -> str:
        """The fingerprint of the trained weights: the LoRA matrices and EMB rows under LoRA
        (what an adapter save holds), else every weight of the model.

        Cached until a tensor changes (an optimizer step or a load bumps its version).
        """
        state, key = self._weights_state()
        if self._weights_fp is None or self._weights_fp[0] != key:
            self._weights_fp = (key, tensors_fingerprint(state))
        return self._weights_fp[1]

    def _weights_state(self) -> tuple[dict[str, torch.Tensor], tuple]:
        """(trained weights, a key that changes when any of them changes or moves)."""
        state = adapter_state(self.model) if is_peft(self.model) else self.model.state_dict()
        return state, tuple((name, t.data_ptr(), t._version) for name, t in state.items())

    def activation_checkpointing_enable(
        self, activation_checkpointing_kwargs: Mapping[str, Any] | None = None, **kwargs: Any
    ) -> None:
        """Recompute activations in backward (the Trainer calls this when asked).

        Works with transformers versions before and after the gradient -> activation rename.
        """
        ckpt = dict(activation_checkpointing_kwargs or {"use_reentrant": False})
        base = self._base()
        if hasattr(base, "activation_checkpointing_enable"):
            base.activation_checkpointing_enable(activation_checkpointing_kwargs=ckpt, **kwargs)
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt)
        if is_peft(self.model):  # inputs of frozen embeddings must carry grad for checkpointing
            base.enable_input_require_grads()

    def gradient_checkpointing_enable(
        self, gradient_checkpointing_kwargs: Mapping[str, Any] | None = None, **kwargs: Any
    ) -> None:
        """Alias of `activation_checkpointing_enable` (older transformers call this name)."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    # ------------------------------------------------------------------ precision & parts
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def compute_dtype(self) -> torch.dtype:
        """bf16 or fp32, resolved from `config.dtype` for the current device."""
        return resolve_dtype(self.config.dtype, self.device)

    def autocast(self) -> AbstractContextManager:
        """bf16 autocast when the compute dtype is bf16 (weights stay as loaded)."""
        bf16 = self.compute_dtype == torch.bfloat16
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16)

    def _base(self) -> Any:
        return self.model.get_base_model() if is_peft(self.model) else self.model

    def _sync_fp32_layers(self) -> None:
        """Keeps the first `config.fp32_layers` decoder layers in fp32 under bf16 autocast."""
        n = self.config.fp32_layers
        if n == self._fp32_layers:
            return
        for handle in self._fp32_hooks:
            handle.remove()
        layers = getattr(self._base().get_decoder(), "layers", None)
        if layers is None and n:
            logger.warning("%s: no decoder .layers; fp32_layers=%d is ignored", self.name, n)
        self._fp32_hooks = keep_fp32(list(layers or [])[:n])
        self._fp32_layers = n

    def _body(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Final hidden states (B, L, H) of the decoder body: the LM head is never computed.

        A CSIT batch (`collate.csit_batch`) carries lengths, not a mask: its (B, 1, L, L)
        session mask is built here, on the model's device, in the weights' dtype.
        """
        device = self.device
        mask = batch["attention_mask"].to(device)  # (B, L)
        if "response_starts" in batch:
            lengths = {k: batch[k].to(device) for k in ("masked_session_lens", "response_starts")}
            dtype = next(self.model.parameters()).dtype
            mask = csit_mask({"attention_mask": mask, **lengths}, dtype)  # (B, 1, L, L)
        self._sync_fp32_layers()
        with self.autocast():
            out = self._base().get_decoder()(
                input_ids=batch["input_ids"].to(device),
                attention_mask=mask,
                position_ids=batch["position_ids"].to(device),
                use_cache=False,
            )
        return out.last_hidden_state  # (B, L, H)

    def _finish(self, emb: torch.Tensor) -> torch.Tensor:
        emb = emb.float()  # (B, H)
        return F.normalize(emb, dim=-1) if self.normalize else emb

    # ------------------------------------------------------------------ training forward
    def embed(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Embeddings (B, D) float32 of a `collate.encode_batch` batch, with gradients.

        The last EMB token is found from the ids and the mask, so either padding side works.
        """
        hidden = self._body(batch)  # (B, L, H)
        ids = batch["input_ids"].to(hidden.device)
        pos = last_token_positions(ids, batch["attention_mask"].to(hidden.device), self.emb_ids[-1])
        return self._finish(hidden[torch.arange(hidden.shape[0], device=hidden.device), pos])

    def csit_forward(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One pass over [session, EMB, response] (`collate.csit_batch`).

        Returns:
            {"session_emb": (B, D) float32 (equal to a standalone encoding: session rows are
            causal), "lm_logits": (N, V) float32 at the N positions that predict a labelled
            token, "lm_labels": (N,) their targets}.
        """
        hidden = self._body(batch)  # (B, L, H)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        session_emb = self._finish(hidden[rows, batch["session_emb_pos"].to(hidden.device)])
        targets = batch["labels"].to(hidden.device)[:, 1:]  # (B, L - 1): next token of each pos
        keep = targets != IGNORE_INDEX
        with self.autocast():
            logits = self._base().get_output_embeddings()(hidden[:, :-1][keep])  # (N, V)
        cap = getattr(self.model.config.get_text_config(), "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return {"session_emb": session_emb, "lm_logits": logits.float(), "lm_labels": targets[keep]}

    def forward(
        self,
        sessions: Mapping[str, torch.Tensor],
        passages: Mapping[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """The training forward: session side (CSIT batch or plain batch) and passages.

        Args:
            sessions: A `csit_batch` (has "labels") or an `encode_batch` of sessions.
            passages: An `encode_batch` of positives and hard negatives (own forward), or None.

        Returns:
            {"session_emb": (B, D)} (+ "lm_logits", "lm_labels" for a CSIT batch)
            (+ "passage_emb": (P, D) in the passage batch's order).
        """
        out = (
            self.csit_forward(sessions)
            if "labels" in sessions
            else {"session_emb": self.embed(sessions)}
        )
        if passages is not None:
            out["passage_emb"] = self.embed(passages)
        return out
