"""Perplexity over a long token sequence in (optionally overlapping) windows.

Which tokens are scored: the text is tokenized once (with the tokenizer's special tokens, so BOS leads when the
tokenizer adds it), giving x_0 .. x_{N-1}. Window w covers positions [b, e) with b = w·stride and
e = min(b + ctx, N); each window is a fresh forward from position 0 (no state carried between windows).
Window w scores the tokens at positions [max(e_{w-1}, b + 1), e), each predicted from x_b .. x_{p-1}.

- stride < ctx (default stride = ctx // 2): every token x_1 .. x_{N-1} is scored exactly once, and every scored
  token outside the first window sees at least ctx - stride tokens of context; this is HF's strided-perplexity
  scheme. With ctx // 2 the scored tokens see ctx/2 .. ctx-1 tokens, as in llama-perplexity's "second half".
- stride = ctx: disjoint chunks; the first token of each chunk has no context and is not scored.

The returned count is the number of scored tokens.
"""

from __future__ import annotations

import math
import numbers
import sys

import torch
from tqdm import tqdm

from bitnet158.runtime.model import Transformer


class PerplexityError(ValueError):
    """Bad window parameters or a text too short to score."""


def window_plan(n: int, ctx: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position) per window, for n tokens; see the module docstring."""
    if n < 2:
        raise PerplexityError(f"the text has {n} token(s); perplexity needs at least 2")
    for name, v in (("ctx", ctx), ("stride", stride)):
        if not isinstance(v, numbers.Integral) or isinstance(v, bool):  # 16.0 would fail inside, cache half-made
            raise PerplexityError(f"{name} must be an int, got {v!r}")
    if ctx < 2:
        raise PerplexityError(f"ctx must be >= 2, got {ctx}")
    if not 1 <= stride <= ctx:
        raise PerplexityError(f"stride must be in [1, ctx={ctx}], got {stride}")
    plan, b, prev_end = [], 0, 0
    while True:
        e = min(b + ctx, n)
        plan.append((b, e, max(prev_end, b + 1)))
        if e == n:
            return plan
        prev_end = e
        b += stride


def check_windows(n: int, ctx: int, stride: int, context: int) -> list[tuple[int, int, int]]:
    """window_plan for a model of ``context`` positions: its PerplexityError, before anything runs."""
    plan = window_plan(n, ctx, stride)
    if ctx > context:
        raise PerplexityError(f"ctx={ctx} exceeds the model context {context}")
    return plan


@torch.inference_mode()
def perplexity(
    net: Transformer, ids: list[int], ctx: int, stride: int, progress: bool = False, forward=None
) -> tuple[float, int]:
    """Perplexity exp(mean NLL) over ``ids`` and the number of scored tokens.

    ``forward(tokens [1, T], start_pos) -> fp32 logits [1, T, V]`` replaces ``net``'s own (the fast path's)."""
    forward = forward or net
    plan = check_windows(len(ids), ctx, stride, net.config.max_position_embeddings)
    net.setup_cache(1, min(ctx, len(ids)))
    tokens = torch.tensor(ids, dtype=torch.long, device=net.device)
    nll, count = 0.0, 0
    for b, e, first in tqdm(plan, desc="perplexity", unit="window", disable=not progress, file=sys.stderr):
        logits = forward(tokens[b:e][None], 0)[0]  # [e-b, V] fp32; row i predicts position b+i+1
        logprobs = torch.log_softmax(logits[first - 1 - b : e - 1 - b], dim=-1)  # rows predicting first..e-1
        target = tokens[first:e]
        nll -= logprobs.gather(1, target[:, None]).double().sum().item()
        count += e - first
    return math.exp(nll / count), count
