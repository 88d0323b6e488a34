"""Token sampling: greedy, temperature, top-k, top-p, min-p and repetition penalty, seeded.

The processors follow transformers' logits warpers (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
TopKLogitsWarper, TopPLogitsWarper, MinPLogitsWarper) in that order. Everything stays on the device: the sampled id comes back as a
tensor, so the caller decides when to synchronise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class SamplingError(ValueError):
    """An out-of-range sampling parameter."""


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 means greedy; top_k 0/None, top_p 1.0/None and min_p 0/None disable those filters."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    seed: int | None = None
    min_p: float | None = None

    def __post_init__(self):
        if not self.temperature >= 0:
            raise SamplingError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 0:
            raise SamplingError(f"top_k must be >= 0, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise SamplingError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            raise SamplingError(f"min_p must be in [0, 1], got {self.min_p}")
        if not self.repetition_penalty > 0:
            raise SamplingError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """logits [V]; seen: ids already in the context. Divide positive / multiply negative logits by ``penalty``."""
    if penalty == 1.0 or seen.numel() == 0:
        return logits
    score = logits.gather(0, seen)
    score = torch.where(score < 0, score * penalty, score / penalty)
    return logits.scatter(0, seen, score)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits [V] (ties at the k-th value kept too), -inf elsewhere."""
    k = min(k, logits.shape[-1])
    kth = torch.topk(logits, k).values[-1]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float | torch.Tensor) -> torch.Tensor:
    """Nucleus filter [V]: keep the smallest set of top tokens whose probability reaches ``p`` (at least one)."""
    sorted_logits, idx = torch.sort(logits, descending=False)
    cum = sorted_logits.softmax(-1).cumsum(-1)
    remove = cum <= 1 - p  # the low tail whose total mass is at most 1 - p
    # keep the most likely token; fill_ with a Python scalar, since `remove[-1] = False` copies a CPU tensor, which
    # CUDA graph capture refuses (runtime/fast.py's sample_on_device; seen on the H200)
    remove[-1:].fill_(False)
    return logits.masked_fill(remove.scatter(0, idx, remove), float("-inf"))


def min_p_filter(logits: torch.Tensor, p: float | torch.Tensor) -> torch.Tensor:
    """Min-p filter [V]: keep the tokens whose probability is at least ``p`` times the top token's (which stays)."""
    probs = logits.softmax(-1)
    return logits.masked_fill(probs < p * probs.max(), float("-inf"))


class Sampler:
    """Picks the next token from fp32 logits [V]; holds the seeded generator, so one Sampler = one stream."""

    def __init__(self, params: SamplingParams, device: torch.device | str = "cpu"):
        self.params = params
        self.generator = None
        if params.temperature > 0:
            self.generator = torch.Generator(device=device)
            if params.seed is not None:
                self.generator.manual_seed(params.seed)
            else:
                self.generator.seed()

    def __call__(self, logits: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
        """logits fp32 [V], seen int64 [n] (prompt + generated ids) → next id, int64 tensor [1]."""
        p = self.params
        logits = apply_repetition_penalty(logits, seen, p.repetition_penalty)
        if p.temperature == 0:
            return logits.argmax(-1, keepdim=True)
        logits = logits / p.temperature
        if p.top_k:
            logits = top_k_filter(logits, p.top_k)
        if p.top_p is not None and p.top_p < 1.0:
            logits = top_p_filter(logits, p.top_p)
        if p.min_p:
            logits = min_p_filter(logits, p.min_p)
        probs = logits.softmax(-1)
        return torch.multinomial(probs, 1, generator=self.generator)
