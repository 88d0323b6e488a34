"""Opens a weight source by its magic: a bitnet158 packed file or a GGUF file.

Both expose the same read surface (``.config``, ``.tokenizer``, ``.tensors``, ``.torch(name)``,
``.ternary(name)``, ``.close()``; see PACKED.md §2.2-4 for the names and dicts).
"""

from __future__ import annotations

import importlib
import os
import re
from pathlib import Path

from bitnet158.formats.packed import MAGIC, PackedFile

__all__ = ["open_source", "fetch_from_hub", "SourceError", "GGUF_MAGIC", "HUB_ID", "is_hub_repo"]

GGUF_MAGIC = b"GGUF"
_FILE_SUFFIX = re.compile(r"\.(bin|bnp|gguf)$")  # names of model files, not of repositories
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")  # a Hugging Face hub id, org/name


def is_hub_repo(spec: str) -> bool:
    """``spec`` reads as a hub repository, org/name, and not as a model file's path (org/name.gguf, .bin)."""
    return bool(HUB_ID.match(spec)) and not _FILE_SUFFIX.search(spec)


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


def fetch_from_hub(spec: str) -> tuple[str, str, str | None]:
    """``spec`` as (local path, source, revision) for reading and for a provenance. A path that exists is itself.
    Else, from the Hugging Face hub (through huggingface_hub's cache, offline too): ``org/name/file`` is that file;
    ``org/name`` is the repository's one .gguf file (e.g. microsoft/bitnet-b1.58-2B-4T-gguf). None or several: an
    error that says what to do, before anything is downloaded. SourceError otherwise."""
    local = os.path.expanduser(spec)
    if os.path.exists(local):
        return local, os.path.abspath(local), None
    parts = spec.split("/")
    repo = "/".join(parts[:2])
    # a missing local file rather than a repository: no org/name shape, or org/name.bin, org/name.gguf
    if len(parts) < 2 or "" in parts or not HUB_ID.match(repo) or (len(parts) == 2 and not is_hub_repo(spec)):
        raise SourceError(f"cannot read {spec}: No such file or directory")
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download

    def unreadable(e: Exception) -> SourceError:  # huggingface_hub's many errors (offline, missing, gated): one line
        return SourceError(f"cannot read {spec}: no such file, nor from the hub ({type(e).__name__}: "
                           f"{' '.join(str(e).split())})")

    def download(name: str) -> tuple[str, str, str | None]:
        got = Path(hf_hub_download(repo, name))  # .../snapshots/<commit>/<name>
        commit = got.parents[len(Path(name).parts) - 1].name
        return str(got), f"{repo}/{name}", commit if re.fullmatch(r"[0-9a-f]{40}", commit) else None

    try:
        if len(parts) > 2:
            return download("/".join(parts[2:]))
        try:  # the hub lists the repository: a cache may hold only part of it
            names = HfApi().list_repo_files(repo)
        except Exception as listing:  # noqa: BLE001 - offline or no network: what the local cache holds
            try:
                snap = snapshot_download(repo, local_files_only=True)  # the folder of what is cached: no download
            except Exception:  # noqa: BLE001 - not cached either: the listing's error says more
                raise listing from None
            names = [os.path.relpath(os.path.join(d, f), snap) for d, _, fs in os.walk(snap) for f in fs]
    except Exception as e:  # noqa: BLE001 - any of them: one line (unreadable)
        raise unreadable(e) from e
    ggufs = sorted(n for n in names if n.endswith(".gguf"))
    if not ggufs and "config.json" in names:
        convert = f"convert it first: bitnet-convert hf-to-packed {repo} -o model.bin"
        raise SourceError(f"{repo} holds no GGUF file but a Hugging Face checkpoint: {convert}")
    if not ggufs:
        raise SourceError(f"{repo} holds no GGUF file; name the model file as {repo}/FILE")
    if len(ggufs) > 1:
        raise SourceError(f"{repo} holds {len(ggufs)} GGUF files ({', '.join(ggufs)}); name one as {repo}/FILE.gguf")
    try:
        return download(ggufs[0])
    except Exception as e:  # noqa: BLE001 - as above
        raise unreadable(e) from e


def open_source(path: str | os.PathLike, activation: str | None = None):
    """Opens `path` as a :class:`PackedFile` or a ``GGUFSource``, chosen by the file's first bytes. A path that
    does not exist may be a hub spec (``fetch_from_hub``: org/name/file, or org/name's one GGUF).

    ``activation`` ("relu2" or "silu") overrides the activation the file records. GGUF needs it because
    Microsoft's converter labels 1bitLLM (SiLU) models ``bitnet-b1.58`` and records no activation; for a packed
    file it is an explicit what-if (the file's own config is right by construction).
    """
    path = os.fspath(path)
    if activation not in (None, *ACTIVATIONS):
        raise SourceError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
    if os.path.isdir(path):
        convert = f"convert it first: bitnet-convert hf-to-packed {path} -o model.bin"
        raise SourceError(f"{path} is a directory, not a model file (a Hugging Face checkpoint? {convert})")
    path = fetch_from_hub(path)[0]
    try:
        with open(path, "rb") as f:
            magic = f.read(len(MAGIC))
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
