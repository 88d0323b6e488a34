"""Normalize a Hugging Face tokenizer to the packed format's tokenizer object (PACKED.md §4).

The source folder's tokenizer is loaded by transformers' own ``AutoTokenizer`` (never remote code), the oracle
that users compare against: what it layers on tokenizer.json from tokenizer_config.json, special_tokens_map.json
and added_tokens.json (special tokens registered as added tokens, a ``LlamaTokenizer``'s pre-tokenizer rebuilt
from ``legacy``/``add_prefix_space``, BOS/EOS insertion), and a SentencePiece-only ``tokenizer.model`` converted
by its slow→fast conversion (the optional extra ``bitnet158[sentencepiece]``), all end in its backend
``tokenizers`` serialization. That is stored, with the chat template transformers picks and the special-token
strings it hands to a template, so that the runtime tokenizes and renders chats as transformers does.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import tempfile
from pathlib import Path

from tokenizers import Tokenizer

log = logging.getLogger(__name__)

# Files a tokenizer may live in (and transformers' folder of named chat templates, which the hub download also
# fetches: TOKENIZER_PATTERNS).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
)
TOKENIZER_PATTERNS = (*TOKENIZER_FILES, "additional_chat_templates/*.jinja")


class TokenizerError(ValueError):
    """The source's tokenizer is missing or cannot be normalized."""


def embedding_rows(tok: Tokenizer) -> int:
    """The embedding rows ``tok``'s ids need: its largest id, added tokens included, plus one (more than its count of
    tokens where the vocabulary has gaps)."""
    return max(tok.get_vocab(with_added_tokens=True).values(), default=-1) + 1


def _tokenizer_files(folder: Path) -> list[str]:
    """The tokenizer files of ``folder`` that transformers reads, as names relative to it (tokenizer.model only
    without a tokenizer.json, which wins), each checked to be readable: a bad one is named here, not reported
    by transformers as some exception deep in its loading."""
    names = [name for name in TOKENIZER_FILES if (folder / name).is_file()]
    if "tokenizer.json" in names and "tokenizer.model" in names:
        names.remove("tokenizer.model")
    names += sorted(f"additional_chat_templates/{p.name}" for p in folder.glob("additional_chat_templates/*.jinja"))
    for name in names:
        if name.endswith(".json") and name != "tokenizer.json":  # tokenizer.json: the tokenizers library's to check
            _read_json(folder / name)
        elif name.endswith(".jinja"):
            try:
                (folder / name).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise TokenizerError(f"{name}: cannot read it as UTF-8 text ({e})") from e
    return names


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:  # RecursionError: nested too deep
        raise TokenizerError(f"{path.name}: cannot read it as JSON ({e})") from e
    if not isinstance(data, dict):
        raise TokenizerError(f"{path.name}: expected a JSON object, found {type(data).__name__}")
    return data


def _auto_tokenizer(folder: Path, names: list[str]):
    """transformers' AutoTokenizer for ``folder``, local files only, no remote code.

    It loads from a folder of links to the tokenizer files ``names`` and a config.json with only ``model_type`` and
    ``tokenizer_class``, which choose the tokenizer class where tokenizer_config.json names none: transformers
    would also validate the whole config.json, and report a bad value there as a tokenizer failure before our own
    checks."""
    try:
        from transformers import AutoTokenizer
    except ImportError as e:
        raise TokenizerError("converting a Hugging Face tokenizer needs transformers: pip install transformers") from e
    if "tokenizer.json" not in names and importlib.util.find_spec("sentencepiece") is None:
        raise TokenizerError("this source has only a SentencePiece tokenizer.model; converting it needs "
                             "sentencepiece: pip install 'bitnet158[sentencepiece]'")
    model_config = {}
    if (folder / "config.json").is_file():
        try:
            cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            cfg = {}  # the converter's own config checks say what is wrong with it
        # what AutoTokenizer reads from config.json where tokenizer_config.json names no class
        model_config = {k: cfg[k] for k in ("model_type", "tokenizer_class") if isinstance(cfg, dict)
                        and isinstance(cfg.get(k), str)}  # fmt: skip
    try:
        with tempfile.TemporaryDirectory(prefix="bitnet158-tokenizer-") as tmp:
            for name in names:
                (Path(tmp) / name).parent.mkdir(exist_ok=True)
                os.symlink((folder / name).resolve(), Path(tmp) / name)
            if "model_type" in model_config:
                (Path(tmp) / "config.json").write_text(json.dumps(model_config), encoding="utf-8")
            return AutoTokenizer.from_pretrained(tmp, trust_remote_code=False, local_files_only=True)
    except BaseException as e:  # many exception types, or a Rust panic (a BaseException) from a broken tokenizer.json
        if not isinstance(e, Exception) and type(e).__module__ != "pyo3_runtime":
            raise
        raise TokenizerError(f"transformers could not load the tokenizer ({type(e).__name__}: {e})") from e


def _chat_template(folder: Path, hf) -> str | None:
    """The template transformers applies without a name: its ``chat_template`` (chat_template.jinja first, then
    tokenizer_config.json's), the "default" one of several named ones; a processor's chat_template.json only where
    the tokenizer has none."""
    tmpl = hf.chat_template
    if isinstance(tmpl, dict):
        if not isinstance(tmpl.get("default"), str):
            log.warning("the chat templates %s have no 'default', which transformers needs a name for: none is "
                        "stored", sorted(map(str, tmpl)))
            return None
        return tmpl["default"]
    if tmpl is None and (folder / "chat_template.json").is_file():
        tmpl = _read_json(folder / "chat_template.json").get("chat_template")
    if tmpl is not None and not isinstance(tmpl, str):
        raise TokenizerError(f"chat_template: expected a string, found {type(tmpl).__name__}")
    return tmpl


def normalize_tokenizer(folder: Path) -> tuple[dict, list[str], dict]:
    """Build the PACKED.md §4 tokenizer object from a HF model folder.

    Returns (tokenizer dict, names of the source files used, facts for the model config:
    ``bos_token_id``/``eos_token_id`` (ids of bos_token/eos_token or None) and ``vocab_size``, the embedding rows
    its ids need: the largest id, added tokens included, plus one, which a vocabulary with gaps makes more than
    its count of tokens).
    """
    folder = Path(folder)
    if not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer.model").is_file():
        raise TokenizerError(f"{folder}: no tokenizer.json or tokenizer.model")
    used = _tokenizer_files(folder)
    hf = _auto_tokenizer(folder, used)
    try:
        tok = Tokenizer.from_str(hf.backend_tokenizer.to_str())
        # some inconsistent files load, then panic on first use (a post-processor naming a token that the
        # vocabulary lacks): used once here, such a file is refused before anything is written
        tok.decode(tok.encode("a 1", add_special_tokens=True).ids)
    except BaseException as e:  # tokenizers raises a bare Exception, or a Rust panic (a BaseException)
        if not isinstance(e, Exception) and type(e).__module__ != "pyo3_runtime":
            raise
        source = "tokenizer.json" if "tokenizer.json" in used else "tokenizer.model"
        raise TokenizerError(f"{source}: cannot load or use it ({e})") from e

    # the named special tokens that are set (bos_token ... mask_token, and a model's own, e.g. image_token): what
    # transformers hands to a chat template
    special = {k: v for k, v in hf.special_tokens_map.items() if isinstance(v, str)}
    bos, eos = special.get("bos_token"), special.get("eos_token")
    bos_id = tok.token_to_id(bos) if bos is not None else None
    eos_id = tok.token_to_id(eos) if eos is not None else None
    # What the post-processor does, for display: the ids it puts around an empty input.
    ids = tok.encode("", add_special_tokens=True).ids
    add_bos = bos_id is not None and len(ids) > 0 and ids[0] == bos_id
    add_eos = eos_id is not None and len(ids) > 0 and ids[-1] == eos_id and not (add_bos and len(ids) == 1)
    out = {
        "tokenizer_json": tok.to_str(),
        "chat_template": _chat_template(folder, hf),
        "bos_token": bos,
        "eos_token": eos,
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "special_tokens": special,
    }
    return out, used, {"bos_token_id": bos_id, "eos_token_id": eos_id,
                       "vocab_size": embedding_rows(tok)}
