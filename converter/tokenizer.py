"""Normalize a Hugging Face tokenizer to the packed format's tokenizer object (PACKED.md §4).

Every source ends as one `tokenizers` serialization (tokenizer.json) whose post-processor inserts BOS/EOS
exactly as transformers' ``AutoTokenizer.encode()`` does, plus the chat template and the special-token strings.

- A ``tokenizer.json`` is read with the `tokenizers` library, and what transformers (v5 ``TokenizersBackend``)
  layers on top of it is replayed from ``tokenizer_config.json``: the named special tokens are registered as
  special added tokens (so their text maps to one id). Its post-processor is kept as it is: transformers v5
  drops ``add_bos_token``/``add_eos_token`` from the config whenever a tokenizer.json exists (v4's
  LlamaTokenizerFast rebuilt the post-processor from them; a mismatch is logged as a warning).
- A SentencePiece-only source (``tokenizer.model``, no tokenizer.json) is converted once by transformers' own
  slow→fast conversion, which needs the optional extra ``bitnet158[sentencepiece]``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from tokenizers import AddedToken, Tokenizer

log = logging.getLogger(__name__)

# Files a tokenizer may live in; the converter downloads exactly these from the hub.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
)


class TokenizerError(ValueError):
    """The source's tokenizer is missing or cannot be normalized."""


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:  # RecursionError: nested too deep
        raise TokenizerError(f"{path.name}: cannot read it as JSON ({e})") from e
    if not isinstance(data, dict):
        raise TokenizerError(f"{path.name}: expected a JSON object, found {type(data).__name__}")
    return data


def _token_str(value) -> str | None:
    """A special token as transformers serializes it: a string, or an AddedToken dict with "content"."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise TokenizerError(f"tokenizer_config.json: cannot read special token {value!r}")


def _chat_template(folder: Path, tcfg: dict) -> str | None:
    """The chat template: chat_template.jinja, then chat_template.json, then tokenizer_config.json.

    Newer transformers save the template in its own file and load it in preference to the config entry.
    A list of named templates keeps the one named "default" (what transformers uses without a name).
    """
    if (folder / "chat_template.jinja").is_file():
        try:
            return (folder / "chat_template.jinja").read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise TokenizerError(f"chat_template.jinja: cannot read it as UTF-8 text ({e})") from e
    value = None
    if (folder / "chat_template.json").is_file():
        value = _read_json(folder / "chat_template.json").get("chat_template")
    if value is None:
        value = tcfg.get("chat_template")
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
        raise TokenizerError(f"chat_template: a list of templates without a 'default' one ({sorted(map(str, named))})")
    raise TokenizerError(f"chat_template: expected a string, found {type(value).__name__}")


def _from_sentencepiece(folder: Path) -> Tokenizer:
    """Convert tokenizer.model with transformers' slow→fast conversion (the oracle users compare against)."""
    import importlib.util

    try:
        from transformers import AutoTokenizer

        if importlib.util.find_spec("sentencepiece") is None:  # transformers needs it for the conversion
            raise ImportError("sentencepiece")
    except ImportError as e:
        raise TokenizerError(
            "this source has only a SentencePiece tokenizer.model; converting it needs transformers and "
            "sentencepiece: pip install 'bitnet158[sentencepiece]'"
        ) from e
    try:
        hf = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    except Exception as e:  # transformers raises many types here; report them as one problem
        raise TokenizerError(f"tokenizer.model: transformers could not load it ({type(e).__name__}: {e})") from e
    return Tokenizer.from_str(hf.backend_tokenizer.to_str())


def normalize_tokenizer(folder: Path) -> tuple[dict, list[str], dict]:
    """Build the PACKED.md §4 tokenizer object from a HF model folder.

    Returns (tokenizer dict, names of the source files used, facts for the model config:
    ``bos_token_id``/``eos_token_id`` (ids of bos_token/eos_token or None) and ``vocab_size``, the embedding rows
    its ids need: the largest id, added tokens included, plus one, which a vocabulary with gaps makes more than
    its count of tokens).
    """
    folder = Path(folder)
    used: list[str] = []
    tcfg: dict = {}
    if (folder / "tokenizer_config.json").is_file():
        tcfg = _read_json(folder / "tokenizer_config.json")
        used.append("tokenizer_config.json")
    special_map: dict = {}
    if (folder / "special_tokens_map.json").is_file():
        special_map = _read_json(folder / "special_tokens_map.json")
        used.append("special_tokens_map.json")

    if (folder / "tokenizer.json").is_file():
        try:
            tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
            # some inconsistent files load, then panic on first use (a post-processor naming a token that the
            # vocabulary lacks): used once here, such a file is refused before anything is written
            tok.decode(tok.encode("a 1", add_special_tokens=True).ids)
        except BaseException as e:  # tokenizers raises a bare Exception, or a Rust panic (a BaseException)
            if not isinstance(e, Exception) and type(e).__module__ != "pyo3_runtime":
                raise
            raise TokenizerError(f"tokenizer.json: cannot load or use it ({e})") from e
        used.append("tokenizer.json")
        from_sp = False
    elif (folder / "tokenizer.model").is_file():
        tok = _from_sentencepiece(folder)
        used.append("tokenizer.model")
        from_sp = True
    else:
        raise TokenizerError(f"{folder}: no tokenizer.json or tokenizer.model")

    def special(key: str) -> str | None:
        return _token_str(tcfg[key] if key in tcfg else special_map.get(key))

    bos, eos = special("bos_token"), special("eos_token")

    if not from_sp:
        # transformers registers every named special token that is not already an added token as a special
        # added token (taking its vocab id, or a new id when absent), so e.g. "</s>" in text becomes one id.
        named = [special(k) for k in ("bos_token", "eos_token", "unk_token", "pad_token")]
        extra = tcfg.get("additional_special_tokens") or tcfg.get("extra_special_tokens") or []
        if isinstance(extra, list):
            named += [_token_str(t) for t in extra]
        added = {t.content for t in tok.get_added_tokens_decoder().values()}
        todo = [AddedToken(s, special=True, normalized=False) for s in dict.fromkeys(named)
                if s is not None and s not in added]
        if todo:
            log.info("registering special tokens as added tokens: %s", [t.content for t in todo])
            tok.add_special_tokens(todo)
    bos_id = tok.token_to_id(bos) if bos is not None else None
    eos_id = tok.token_to_id(eos) if eos is not None else None
    # What the post-processor does, for display: the ids it puts around an empty input.
    ids = tok.encode("", add_special_tokens=True).ids
    add_bos = bos_id is not None and len(ids) > 0 and ids[0] == bos_id
    add_eos = eos_id is not None and len(ids) > 0 and ids[-1] == eos_id and not (add_bos and len(ids) == 1)
    for key, does in (("add_bos_token", add_bos), ("add_eos_token", add_eos)):
        if key in tcfg and bool(tcfg[key]) != does:
            log.warning("tokenizer_config.json sets %s=%s but the tokenizer.json post-processor %s; keeping the "
                        "post-processor, as transformers v5 does", key, tcfg[key], "does" if does else "does not")

    chat = _chat_template(folder, tcfg)
    for name in ("chat_template.jinja", "chat_template.json"):
        if (folder / name).is_file():
            used.append(name)
    out = {
        "tokenizer_json": tok.to_str(),
        "chat_template": chat,
        "bos_token": bos,
        "eos_token": eos,
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
    }
    return out, used, {"bos_token_id": bos_id, "eos_token_id": eos_id,
                       "vocab_size": max(tok.get_vocab(with_added_tokens=True).values(), default=-1) + 1}
