"""Generation, layered like gpt-fast / mlx-lm:

    Sampler (sampling.py) → prefill / decode_one_token (static KV cache) → generate_tokens (ids) → stream_text (text)

``decode_one_token`` is the per-token step a fast path replaces (e.g. captured in a CUDA graph through
``Transformer.forward(tokens, pos_tensor)``, which has static shapes).
"""

from __future__ import annotations

import numbers
import time
from dataclasses import dataclass, field
from typing import Iterator

import torch

from bitnet158.runtime.model import Transformer
from bitnet158.runtime.sampling import Sampler
from bitnet158.runtime.tokenizer import Tokenizer


class ContextOverflowError(ValueError):
    """The prompt plus the tokens to generate do not fit in the model's context."""


@dataclass
class GenerationStats:
    """Filled in while a generation runs; read it after the iterator is exhausted."""

    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose keys/values the cache kept from the last generation (not run)
    generated_tokens: int = 0
    decode_steps: int = 0  # decode steps run: the tokens after the first, with a stop id's and the run-ahead's
    prefill_s: float = 0.0
    decode_s: float = 0.0
    warmup_s: float = 0.0  # a fast path's compiling before its first prefill (GraphDecoder.warm_up), in neither rate
    truncated_tokens: int = 0
    stop_reason: str = ""
    path: str = ""  # which implementation ran: "reference", "triton + CUDA graph", "cpu + device sampling"…
    token_ids: list[int] = field(default_factory=list)

    @property
    def prefill_tok_s(self) -> float:
        n = self.prompt_tokens - self.cached_tokens  # the tokens the prefill ran
        return n / self.prefill_s if self.prefill_s > 0 else float("nan")

    @property
    def decode_tok_s(self) -> float:
        # decode steps a second: the first token comes out of the prefill, each step makes one more (one that
        # turns out a stop id, or past it, counts: decode_s timed it)
        n = self.decode_steps
        return n / self.decode_s if n > 0 and self.decode_s > 0 else float("nan")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def prefill(net: Transformer, tokens: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
    """Run the prompt tokens [1, T] from ``start_pos``; fp32 logits [V] of the last position."""
    return net(tokens, start_pos)[0, -1]


@torch.inference_mode()
def decode_one_token(net: Transformer, token: torch.Tensor, pos: int) -> torch.Tensor:
    """One decode step: token [1, 1] at position ``pos`` → fp32 logits [V]."""
    return net(token, pos)[0, -1]


def fit_context(prompt_ids: list[int], max_new_tokens: int, context: int, truncate: bool,
                keep: int = 0) -> tuple[list[int], int]:  # fmt: skip
    """Check that prompt + max_new_tokens fits in ``context``; with ``truncate`` drop the oldest prompt tokens
    after the first ``keep`` (a BOS, which the model was trained to see first, as llama.cpp's n_keep keeps it),
    unless they would be all that is left: then the prompt's last tokens.

    Returns (prompt ids to use, number of dropped tokens).
    """
    if not prompt_ids:
        raise ValueError("the prompt is empty: nothing to condition on (give a prompt, or a tokenizer that adds BOS)")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    need = len(prompt_ids) + max_new_tokens
    if need <= context:
        return prompt_ids, 0
    if max_new_tokens + keep >= context:  # the kept tokens would be the whole prompt: keep its end instead
        keep = 0
    if not truncate or max_new_tokens >= context:
        raise ContextOverflowError(
            f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({max_new_tokens}) = {need} exceeds the context "
            f"of {context} tokens; shorten the prompt, lower max_new_tokens"
            + (", or allow truncation (--truncate)" if not truncate else "")
        )
    drop = need - context
    return prompt_ids[:keep] + prompt_ids[keep + drop:], drop


def generate_tokens(
    net: Transformer,
    prompt_ids: list[int],
    max_new_tokens: int,
    sampler: Sampler,
    stop_ids: tuple[int, ...] = (),
    stats: GenerationStats | None = None,
) -> Iterator[int]:
    """Yield generated token ids until a stop id (not yielded) or ``max_new_tokens``. Cache must fit them."""
    stats = stats if stats is not None else GenerationStats()
    device = net.device
    net.setup_cache(1, len(prompt_ids) + max_new_tokens)
    tokens = torch.tensor([prompt_ids], dtype=torch.long, device=device)  # [1, T]
    seen = tokens[0]  # ids the repetition penalty looks at (prompt + generated)
    stats.prompt_tokens = len(prompt_ids)
    stops = set(stop_ids)

    t0 = time.perf_counter()
    logits = prefill(net, tokens)
    nxt = sampler(logits, seen)  # [1]
    tok = int(nxt)  # host sync: the stop check needs the value
    stats.prefill_s = time.perf_counter() - t0
    stats.stop_reason = "length"
    t1 = time.perf_counter()
    pos = len(prompt_ids)
    try:
        for i in range(max_new_tokens):
            if tok in stops:
                stats.stop_reason = "eos"
                break
            stats.generated_tokens += 1
            stats.token_ids.append(tok)
            yield tok
            if i == max_new_tokens - 1:
                break
            seen = torch.cat([seen, nxt])
            logits = decode_one_token(net, nxt.view(1, 1), pos)
            stats.decode_steps += 1
            pos += 1
            nxt = sampler(logits, seen)
            tok = int(nxt)
    finally:
        _sync(device)
        stats.decode_s = time.perf_counter() - t1


def _held_back(text: str, stop_strings: list[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of some stop string."""
    for k in range(min(len(text), max(len(s) for s in stop_strings) - 1), 0, -1):
        if any(s.startswith(text[-k:]) for s in stop_strings):
            return k
    return 0


def _first_stop(text: str, stop_strings: list[str]) -> int:
    return min((i for i in (text.find(s) for s in stop_strings) if i >= 0), default=-1)


def stream_text(
    tokenizer: Tokenizer,
    token_iter: Iterator[int],
    prompt_ids: list[int],
    stop_strings: list[str] = (),
    stats: GenerationStats | None = None,
) -> Iterator[str]:
    """Turn token ids into text pieces; end at the first user stop string, which is not emitted.

    Text that could be the start of a stop string is held back until it is clear it is not one.
    """
    decoder = tokenizer.stream(prompt_ids)
    stop_strings = [s for s in stop_strings if s]
    pending = ""
    for tok in token_iter:
        pending += decoder.push(tok)
        if not stop_strings:
            if pending:
                yield pending
            pending = ""
            continue
        cut = _first_stop(pending, stop_strings)
        if cut >= 0:
            if cut:
                yield pending[:cut]
            if stats is not None:
                stats.stop_reason = "stop string"
            token_iter.close()  # ends the decode loop (its finally records the timing)
            return
        keep = _held_back(pending, stop_strings)
        if len(pending) > keep:
            yield pending[: len(pending) - keep]
            pending = pending[len(pending) - keep :]
    pending += decoder.flush()
    cut = _first_stop(pending, stop_strings) if stop_strings else -1
    if cut >= 0:
        pending = pending[:cut]
        if stats is not None:
            stats.stop_reason = "stop string"
    if pending:
        yield pending
