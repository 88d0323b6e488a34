"""Opens a weight source by its magic: a bitnet158 packed file or a GGUF file.

Both expose the same read surface (``.config``, ``.tokenizer``, ``.tensors``, ``.torch(name)``,
``.ternary(name)``, ``.close()``; see PACKED.md §2.2-4 for the names and dicts).
"""

from __future__ import annotations

import importlib
import os
import re

from bitnet158.formats.packed import MAGIC, PackedFile

__all__ = ["open_source", "SourceError", "GGUF_MAGIC", "HUB_ID"]

GGUF_MAGIC = b"GGUF"
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")  # a Hugging Face hub id, org/name


class SourceError(ValueError):
    """The path cannot be opened as a weight source (missing, unreadable, or neither packed nor GGUF)."""


ACTIVATIONS = ("relu2", "silu")


class _ActivationOverride:
    """A packed file read as if its config said ``hidden_act = activation`` (same read surface)."""

    def __init__(self, source: PackedFile, activation: str):
        self._source = source
        self.config = {**source.config, "hidden_act": activation}

    def __getattr__(self, name):
        return getattr(self._source, name)


def open_source(path: str | os.PathLike, activation: str | None = None):
    """Opens `path` as a :class:`PackedFile` or a ``GGUFSource``, chosen by the file's first bytes.

    ``activation`` ("relu2" or "silu") overrides the activation the file records. GGUF needs it because
    Microsoft's converter labels 1bitLLM (SiLU) models ``bitnet-b1.58`` and records no activation; for a packed
    file it is an explicit what-if (the file's own config is right by construction).
    """
    path = os.fspath(path)
    if activation not in (None, *ACTIVATIONS):
        raise SourceError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
    convert = f"convert it first: bitnet-convert hf-to-packed {path} -o model.bin"
    try:
        with open(path, "rb") as f:
            magic = f.read(len(MAGIC))
    except IsADirectoryError:
        raise SourceError(f"{path} is a directory, not a model file (a Hugging Face checkpoint? {convert})") from None
    except FileNotFoundError as e:
        # "org/name" that is not a local path: most likely a hub id, which only the converter fetches
        hint = f" (a hub id? {convert})" if HUB_ID.match(path) else ""
        raise SourceError(f"cannot read {path}: {e.strerror or e}{hint}") from e
    except OSError as e:
        raise SourceError(f"cannot read {path}: {e.strerror or e}") from e
    if magic == MAGIC:
        packed = PackedFile(path)
        return packed if activation is None else _ActivationOverride(packed, activation)
    if magic[: len(GGUF_MAGIC)] == GGUF_MAGIC:
        try:
            gguf = importlib.import_module("bitnet158.formats.gguf")
        except ModuleNotFoundError as e:
            if e.name != "bitnet158.formats.gguf":
                raise
            raise SourceError(
                f"{path} is a GGUF file, but this build has no GGUF reader (bitnet158.formats.gguf)"
            ) from None
        return gguf.GGUFSource(path, activation=activation)
    raise SourceError(f"{path} is not a bitnet158 packed file or a GGUF file (magic {magic!r})")
