"""The packed format's model config (formats/PACKED.md §3): its validation and the ModelConfig it yields.

The header is untrusted input: every field is type- and range-checked here, before any of it sizes an
allocation (the KV cache, the rope tables, the modules). It lives in ``formats`` (no model code) so that the one
check serves both sides: the runtime validates what it loads, and every writer (PackedWriter, so hf-to-packed,
gguf-to-packed and random models) validates what it writes, so a written file is never refused when loaded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

FAMILIES = ("bitnet", "1bitllm", "llama-bitnet")
ACTIVATIONS = ("relu2", "silu")
ROPE_TYPES = ("default", "linear", "llama3")

# Sanity bounds for header fields. They are far above any real BitNet model and far below what would let a
# lying header make us allocate absurd amounts of memory.
_MAX_DIM = 1 << 17  # hidden / intermediate / head sizes
MAX_LAYERS = 1024
_MAX_HEADS = 4096
MAX_VOCAB = 1 << 22
_MAX_POSITIONS = 1 << 22


class ConfigError(ValueError):
    """The model config in a weight file is missing a field, has a wrong type or an impossible value."""


def _field(d: dict, key: str, kind: type | tuple[type, ...], where: str = "") -> Any:
    """d[key] checked against kind; ``where`` prefixes the key in messages (``rope_scaling.``)."""
    if key not in d:
        raise ConfigError(f"model config: missing key {where + key!r}")
    value = d[key]
    # bool is a subclass of int: never accept True/False where a number is expected.
    if isinstance(value, bool) and kind is not bool:
        raise ConfigError(f"model config: {where}{key} must be {_kind_name(kind)}, got {value!r}")
    if not isinstance(value, kind):
        raise ConfigError(f"model config: {where}{key} must be {_kind_name(kind)}, got {value!r}")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(k.__name__ for k in kinds)


def _int_in(d: dict, key: str, lo: int, hi: int, where: str = "") -> int:
    value = _field(d, key, int, where)
    if not lo <= value <= hi:
        raise ConfigError(f"model config: {where}{key}={value} is outside [{lo}, {hi}]")
    return value


def as_float(v: int | float) -> float:
    """float(v), with a JSON integer past the float range (10**400, valid JSON) as ±inf where float() and
    math.isfinite raise OverflowError: every check of a header number goes through it."""
    try:
        return float(v)
    except OverflowError:
        return math.inf if v > 0 else -math.inf


def _positive_float(d: dict, key: str, where: str = "") -> float:
    value = as_float(_field(d, key, (int, float), where))
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"model config: {where}{key}={value} must be a finite number > 0")
    return value


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of one BitNet b1.58 model; switches the single runtime model between the three families."""

    family: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    rope_theta: float
    rope_style: str
    rope_scaling: dict | None
    rms_norm_eps: float
    hidden_act: str
    sub_norms: bool
    tie_word_embeddings: bool
    bos_token_id: int | None
    eos_token_id: tuple[int, ...]

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """Validate a header config dict (PACKED.md §3); unknown keys are ignored."""
        if not isinstance(d, dict):
            raise ConfigError(f"model config must be an object, got {type(d).__name__}")
        family = _field(d, "family", str)
        if family not in FAMILIES:
            raise ConfigError(f"model config: unknown family {family!r} (known: {', '.join(FAMILIES)})")
        hidden_act = _field(d, "hidden_act", str)
        if hidden_act not in ACTIVATIONS:
            raise ConfigError(f"model config: unsupported hidden_act {hidden_act!r} (supported: relu2, silu)")
        rope_style = _field(d, "rope_style", str)
        if rope_style != "neox":
            raise ConfigError(f"model config: unsupported rope_style {rope_style!r} (supported: neox)")
        heads = _int_in(d, "num_attention_heads", 1, _MAX_HEADS)
        kv_heads = _int_in(d, "num_key_value_heads", 1, _MAX_HEADS)
        if heads % kv_heads:
            raise ConfigError(
                f"model config: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}"
            )
        head_dim = _int_in(d, "head_dim", 2, _MAX_DIM)
        if head_dim % 2:
            raise ConfigError(f"model config: head_dim={head_dim} must be even for rotate-half rope")
        vocab = _int_in(d, "vocab_size", 1, MAX_VOCAB)
        bos = d.get("bos_token_id")
        if bos is not None and (isinstance(bos, bool) or not isinstance(bos, int) or not 0 <= bos < vocab):
            raise ConfigError(f"model config: bos_token_id={bos!r} is not a token id below vocab_size={vocab}")
        eos = _field(d, "eos_token_id", (list, int))
        eos_list = [eos] if isinstance(eos, int) else eos
        for e in eos_list:
            if isinstance(e, bool) or not isinstance(e, int) or not 0 <= e < vocab:
                raise ConfigError(f"model config: eos_token_id {e!r} is not a token id below vocab_size={vocab}")
        return cls(
            family=family,
            hidden_size=_int_in(d, "hidden_size", 1, _MAX_DIM),
            intermediate_size=_int_in(d, "intermediate_size", 1, _MAX_DIM * 4),
            num_hidden_layers=_int_in(d, "num_hidden_layers", 1, MAX_LAYERS),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            vocab_size=vocab,
            max_position_embeddings=_int_in(d, "max_position_embeddings", 1, _MAX_POSITIONS),
            rope_theta=_positive_float(d, "rope_theta"),
            rope_style=rope_style,
            rope_scaling=_rope_scaling(_field(d, "rope_scaling", (dict, type(None)))),
            rms_norm_eps=_positive_float(d, "rms_norm_eps"),
            hidden_act=hidden_act,
            sub_norms=_field(d, "sub_norms", bool),
            tie_word_embeddings=_field(d, "tie_word_embeddings", bool),
            bos_token_id=bos,
            eos_token_id=tuple(eos_list),
        )


def _rope_scaling(rs: dict | None) -> dict | None:
    """Normalise transformers' rope_scaling dict to {"rope_type": ..., params...} or None (plain rope)."""
    if rs is None:
        return None
    rope_type = rs.get("rope_type", rs.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ConfigError(
            f"model config: unsupported rope_scaling type {rope_type!r} (supported: {', '.join(ROPE_TYPES)})"
        )
    if rope_type == "default":
        return None
    where = "rope_scaling."
    out: dict = {"rope_type": rope_type, "factor": _positive_float(rs, "factor", where)}
    if rope_type == "llama3":
        out["low_freq_factor"] = _positive_float(rs, "low_freq_factor", where)
        out["high_freq_factor"] = _positive_float(rs, "high_freq_factor", where)
        out["original_max_position_embeddings"] = _int_in(rs, "original_max_position_embeddings", 1, _MAX_POSITIONS,
                                                          where)
        if out["high_freq_factor"] <= out["low_freq_factor"]:
            raise ConfigError("model config: rope_scaling high_freq_factor must exceed low_freq_factor")
    return out
