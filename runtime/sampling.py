"""Token sampling: greedy, temperature, top-k, top-p, min-p and repetition penalty, seeded.

The processors follow transformers' logits warpers (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
TopKLogitsWarper, TopPLogitsWarper, MinPLogitsWarper) in that order. Everything stays on the device: the sampled id comes back as a
tensor, so the caller decides when to synchronise.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch


class SamplingError(ValueError):
    """An out-of-range sampling parameter."""


class NonFiniteLogitsError(ValueError):
    """The model computed logits that are inf or NaN (non-finite weights in the file)."""


# the seeds torch's generators take (manual_seed: a 64-bit value, signed or not)
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1
TEMPERATURE_MIN = 1e-6  # a smaller positive one is greedy in all but ties
PENALTY_MIN, PENALTY_MAX = 1e-6, 1e6


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
        for names, kind, what in ((("top_k", "seed"), numbers.Integral, "an int or None"),
                                  (("temperature", "top_p", "min_p", "repetition_penalty"), numbers.Real, "a number")):
            for name in names:  # (numpy's scalars pass; a bool, a str or a float where an int goes do not)
                v = getattr(self, name)
                if v is not None and (isinstance(v, bool) or not isinstance(v, kind)):
                    raise SamplingError(f"{name} must be {what}, got {v!r}")
        # scaled logits must stay finite in fp32: logits / temperature and the penalty's division reach inf (then NaN
        # probabilities) only below these bounds (or past them, for a penalty multiplying negative logits)
        if not (self.temperature == 0 or self.temperature >= TEMPERATURE_MIN):
            raise SamplingError(f"temperature must be 0 (greedy) or at least {TEMPERATURE_MIN}, got {self.temperature}")
        if self.top_k is not None and self.top_k < 0:
            raise SamplingError(f"top_k must be >= 0, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise SamplingError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            raise SamplingError(f"min_p must be in [0, 1], got {self.min_p}")
        if not PENALTY_MIN <= self.repetition_penalty <= PENALTY_MAX:
            raise SamplingError(f"repetition_penalty must be in [{PENALTY_MIN}, {PENALTY_MAX}], got "
                                f"{self.repetition_penalty}")
        if self.seed is not None and not SEED_MIN <= self.seed <= SEED_MAX:
            raise SamplingError(f"seed must be a 64-bit integer, in [{SEED_MIN}, {SEED_MAX}], got {self.seed}")


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
    """Nucleus filter [V]: rank the tokens most likely first and keep each one whose higher-ranked tokens hold less
    than ``p`` of the probability: the smallest set of top tokens whose mass reaches p (the top token always
    stays). Among equal logits the lower id ranks first, so ties at the cut keep the lower ids."""
    sorted_logits, idx = torch.sort(logits, descending=True, stable=True)
    probs = sorted_logits.softmax(-1)
    keep = probs.cumsum(-1) - probs < p  # the mass ranked above each token; 0 for the top one, and p > 0
    return logits.masked_fill(~keep.scatter(0, idx, keep), float("-inf"))


def top_k_top_p_filter(logits: torch.Tensor, k: int, p: float | torch.Tensor) -> torch.Tensor:
    """top_p_filter(top_k_filter(logits, k), p) [V] without sorting the vocabulary.

    Top-p needs the order of top-k's survivors only. Those are torch.topk's k candidates, sorted, plus any further
    tokens tied with the k-th logit (top_k_filter keeps ties). The further ones share one logit, so top-p's
    decision on them is a count, and the lower ids are the ones kept, as top_p_filter ranks ties. Everything is
    a tensor op, with no host sync (sample_on_device runs it inside a CUDA graph)."""
    k = min(k, logits.shape[-1])
    vals = torch.topk(logits, k).values  # [k], descending
    e = (vals - vals[:1]).exp()  # [k] the candidates' unnormalised probabilities
    cum = e.cumsum(-1)
    last, total_c = e[-1:], cum[-1:]  # [1] each
    past = (logits == vals[-1:]).sum() - (vals == vals[-1:]).sum()  # tied survivors past the candidates
    z = total_c + past * last  # [1] the survivors' total
    keep = cum - e < p * z  # [k] a prefix: the candidates whose higher-ranked mass is below p
    n = keep.sum()
    cut = vals.gather(0, (n - 1).view(1))  # [1] the lowest kept logit
    # when every candidate stays, the tied tokens past them stay while the mass above each is below p: the first
    # u = ceil((p·z - total_c) / last) of them, at most ``past``; none when last underflowed to 0
    more = torch.minimum(((p * z - total_c) / last).ceil().clamp(min=0), past)
    more = torch.where((n == k) & (last > 0), more, 0)
    at_cut = (keep & (vals == cut)).sum() + more  # [1] how many tokens at the cut logit stay
    tie = logits == cut
    stay = (logits > cut) | (tie & (tie.cumsum(-1) <= at_cut))  # the lowest ids among the ties
    return logits.masked_fill(~stay, float("-inf"))


def min_p_filter(logits: torch.Tensor, p: float | torch.Tensor) -> torch.Tensor:
    """Min-p filter [V]: keep the tokens whose probability is at least ``p`` times the top token's (which stays)."""
    probs = logits.softmax(-1)
    return logits.masked_fill(probs < p * probs.max(), float("-inf"))


def filter_logits(
    logits: torch.Tensor, top_k: int | None, top_p: float | torch.Tensor | None, min_p: float | torch.Tensor | None
) -> torch.Tensor:
    """Temperature-scaled logits [V] through top-k, top-p and min-p, in that order; a None or 0 skips one.
    Top-k with top-p is one filter (top_k_top_p_filter), which sorts k values instead of the vocabulary."""
    if top_k and top_p is not None:
        logits = top_k_top_p_filter(logits, top_k, top_p)
    elif top_k:
        logits = top_k_filter(logits, top_k)
    elif top_p is not None:
        logits = top_p_filter(logits, top_p)
    if min_p is not None:
        logits = min_p_filter(logits, min_p)
    return logits


def check_finite(logits: torch.Tensor) -> None:
    """NonFiniteLogitsError unless every logit is finite: else argmax picks a NaN's id, multinomial fails inside."""
    if not bool(torch.isfinite(logits).all()):
        raise NonFiniteLogitsError("the model's logits are not finite (inf or NaN): the file holds weights that "
                                   "are not finite, or that overflow")


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
        check_finite(logits)
        logits = apply_repetition_penalty(logits, seen, p.repetition_penalty)
        if p.temperature == 0:
            return logits.argmax(-1, keepdim=True)
        logits = logits / p.temperature
        top_p = p.top_p if p.top_p is not None and p.top_p < 1.0 else None
        logits = filter_logits(logits, p.top_k, top_p, p.min_p or None)
        probs = logits.softmax(-1)
        return torch.multinomial(probs, 1, generator=self.generator)
