"""Compare two models on the same token ids: logit deltas, KL, top-1 agreement, perplexity, greedy divergence.

The models are anything with the runtime's surface (`model.logits(ids) -> [T, V] float32`, `model.tokenizer`,
`model.config`). Opening the inputs (packed file, GGUF, HF folder) lives in `open_model`; compare/reference.py
runs an HF checkpoint in transformers instead, the independent reference.
"""

from __future__ import annotations

import contextlib
import logging
import math
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from bitnet158.formats.source import is_hub_repo

logger = logging.getLogger(__name__)

ENGINES = ("bitnet158", "transformers")  # what runs a model: our runtime, or transformers (an HF checkpoint only)


class CompareError(ValueError):
    """The two models cannot be compared (vocab sizes differ, a path is not a model, ...)."""


@dataclass
class Divergence:
    """Greedy continuations of both models from the same prompt ids."""

    tokens: int  # how many tokens each model generated
    first_diff: int | None  # index into the continuation where they first differ; None if they never do
    ids_a: list[int] = field(default_factory=list)
    ids_b: list[int] = field(default_factory=list)
    text_a: str = ""
    text_b: str = ""


@dataclass
class CompareResult:
    """Everything `bitnet-compare` reports (the JSON output is `asdict` of this)."""

    n_tokens: int
    vocab_size: int
    max_abs_logit_diff: float
    mean_kl: float  # mean over positions of KL(A || B), nats
    max_kl: float
    top1_agreement: float  # fraction of positions whose argmax agrees
    ppl_a: float | None  # perplexity of the text's own next tokens (None for a 1-token text)
    ppl_b: float | None
    tokenizer_mismatch: bool
    divergence: Divergence | None
    violations: list[str] = field(default_factory=list)
    trace: dict | None = None  # compare/trace.py's Trace, with trace=True

    def to_dict(self) -> dict:
        return asdict(self)


def logit_stats(la: torch.Tensor, lb: torch.Tensor) -> tuple[float, torch.Tensor, float]:
    """(max |Δlogit|, KL(A‖B) per position [T] in float64, top-1 agreement) of logits [T, V]."""
    la64, lb64 = la.to(torch.float64), lb.to(torch.float64)
    max_abs = float((la64 - lb64).abs().max()) if la.numel() else 0.0
    lpa = torch.log_softmax(la64, dim=-1)
    lpb = torch.log_softmax(lb64, dim=-1)
    # KL(A||B) = Σ p_A (log p_A − log p_B); xlogy-style masking keeps p_A = 0 entries at exactly 0
    kl = torch.where(lpa > -math.inf, lpa.exp() * (lpa - lpb), torch.zeros_like(lpa)).sum(-1)
    top1 = float((la.argmax(-1) == lb.argmax(-1)).to(torch.float64).mean()) if la.shape[0] else 1.0
    return max_abs, kl, top1


def perplexity_from_logits(logits: torch.Tensor, ids: list[int]) -> float | None:
    """exp(mean NLL) of ids[1:] given logits[:-1] (float64); None when there is nothing to predict."""
    if len(ids) < 2:
        return None
    lp = torch.log_softmax(logits[:-1].to(torch.float64), dim=-1)
    target = torch.tensor(ids[1:], dtype=torch.long)
    nll = -lp.gather(1, target[:, None]).mean()
    return float(torch.exp(nll))


def greedy(model, ids: list[int], n: int) -> list[int]:
    """n greedy tokens after ids, one full forward per step (the runtime's logits(), no KV cache needed)."""
    seq = list(ids)
    out: list[int] = []
    for _ in range(n):
        nxt = int(model.logits(seq)[-1].argmax())
        out.append(nxt)
        seq.append(nxt)
    return out


def compare_models(a, b, text: str, *, gen_tokens: int = 16, max_tokens: int | None = None,
                   max_kl: float | None = None, min_top1: float | None = None,
                   max_ppl_diff: float | None = None, trace: bool = False) -> CompareResult:
    """Run both models on A's token ids of `text` and measure how far B is from A.

    Compares at most ``max_tokens`` tokens, and no more than both contexts hold with the ``gen_tokens`` greedy ones.
    Raises CompareError when the vocab sizes differ. A tokenizer mismatch (B's ids differ from A's) is reported
    in the result and logged, and both still run on A's ids; with a threshold or ``trace`` it is a violation (B
    would not see these ids from this text). ``trace``: also compare every linear's input over the first tokens
    (compare/trace.py); its verdicts "differ" and "inconclusive" are violations.
    """
    va, vb = int(a.config.vocab_size), int(b.config.vocab_size)
    if va != vb:
        raise CompareError(f"vocab sizes differ: A has {va} tokens, B has {vb}; the logits cannot be compared")
    ids = list(a.tokenizer.encode(text))
    ids_b = list(b.tokenizer.encode(text))
    mismatch = ids != ids_b
    differ = f"B's tokenizer gives other ids for this text ({len(ids_b)} tokens against A's {len(ids)})"
    if mismatch:
        logger.warning("%s; using A's ids for both", differ)
    # the text, and then each greedy step's text and continuation, must fit both models' context
    ctx = min(int(m.config.max_position_embeddings) for m in (a, b))
    room = ctx - max(gen_tokens - 1, 0)
    if room < 1:
        raise CompareError(f"{gen_tokens} greedy tokens leave no room for the text in a context of {ctx} tokens")
    limit = room if max_tokens is None else min(max_tokens, room)
    if len(ids) > limit:
        logger.info("text has %d tokens; comparing the first %d (context %d, max_tokens %s, %d greedy tokens)",
                    len(ids), limit, ctx, max_tokens, gen_tokens)
        ids = ids[:limit]
    if not ids:
        raise CompareError("the text tokenizes to no tokens")

    with torch.inference_mode():
        la = a.logits(ids).float().cpu()
        lb = b.logits(ids).float().cpu()  # [T, V] both: the vocab sizes are equal
        max_abs, kl, top1 = logit_stats(la, lb)
        div = None
        if gen_tokens > 0:
            ga, gb = greedy(a, ids, gen_tokens), greedy(b, ids, gen_tokens)
            first = next((i for i, (x, y) in enumerate(zip(ga, gb)) if x != y), None)
            div = Divergence(gen_tokens, first, ga, gb, a.tokenizer.decode(ga), b.tokenizer.decode(gb))

    res = CompareResult(
        n_tokens=len(ids),
        vocab_size=va,
        max_abs_logit_diff=max_abs,
        mean_kl=float(kl.mean()),
        max_kl=float(kl.max()),
        top1_agreement=top1,
        ppl_a=perplexity_from_logits(la, ids),
        ppl_b=perplexity_from_logits(lb, ids),
        tokenizer_mismatch=mismatch,
        divergence=div,
    )
    if mismatch and (trace or any(t is not None for t in (max_kl, min_top1, max_ppl_diff))):
        res.violations.append(f"{differ}; both ran on A's")
    if max_kl is not None and not res.mean_kl <= max_kl:
        res.violations.append(f"mean KL {res.mean_kl:.6g} > --max-kl {max_kl:g}")
    if min_top1 is not None and not res.top1_agreement >= min_top1:
        res.violations.append(f"top-1 agreement {res.top1_agreement:.4f} < --min-top1 {min_top1:g}")
    if max_ppl_diff is not None:
        if res.ppl_a is None:
            res.violations.append("--max-ppl-diff needs a text of two tokens or more")
        elif not abs(res.ppl_a / res.ppl_b - 1) <= max_ppl_diff:
            res.violations.append(f"perplexities differ by {abs(res.ppl_a / res.ppl_b - 1):.4%} > --max-ppl-diff "
                                  f"{max_ppl_diff:g}")
    if trace:
        from bitnet158.compare.trace import trace as trace_linears

        res.trace = trace_linears(a, b, ids).to_dict()
        if res.trace["verdict"] in ("differ", "inconclusive"):
            res.violations.append(f"trace: {res.trace['summary']}")
    return res


def format_table(res: CompareResult, name_a: str, name_b: str) -> str:
    """Human-readable report."""

    def ppl(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.4f}"

    rows = [
        ("A", name_a),
        ("B", name_b),
        ("tokens compared", str(res.n_tokens)),
        ("vocab size", str(res.vocab_size)),
        ("max |Δlogit|", f"{res.max_abs_logit_diff:.6g}"),
        ("mean KL(A‖B)", f"{res.mean_kl:.6g}"),
        ("max KL(A‖B)", f"{res.max_kl:.6g}"),
        ("top-1 agreement", f"{res.top1_agreement * 100:.2f}%"),
        ("perplexity A", ppl(res.ppl_a)),
        ("perplexity B", ppl(res.ppl_b)),
    ]
    if res.tokenizer_mismatch:
        rows.append(("tokenizers", "DIFFER on this text (both ran on A's ids)"))
    if res.trace is not None:
        rows.append((f"trace ({res.trace['tokens']} tokens)", res.trace["summary"]))
    d = res.divergence
    if d is not None:
        where = "never (identical)" if d.first_diff is None else f"at generated token {d.first_diff}"
        rows.append((f"greedy {d.tokens} tokens diverge", where))
        rows.append(("greedy A", repr(d.text_a)))
        rows.append(("greedy B", repr(d.text_b)))
    width = max(len(k) for k, _ in rows)
    lines = [f"{k.ljust(width)}  {v}" for k, v in rows]
    for v in res.violations:
        lines.append(f"FAIL: {v}")
    return "\n".join(lines)


def _load(path: str, device: str | None, activation: str | None, traced: bool):
    from bitnet158.formats.source import open_source
    from bitnet158.runtime.loader import build_model

    source = open_source(path, activation=activation)
    try:
        # traced: the plain network in fp32, whose BitLinears see every input (the fast paths fuse or compile them)
        return build_model(source, device=device, reference=traced, dtype="f32" if traced else None)
    finally:
        source.close()


@contextlib.contextmanager
def open_model(path: str, *, device: str | None = None, activation: str | None = None, engine: str = "bitnet158",
               traced: bool = False):
    """Load a packed file, a GGUF, an HF folder or a hub id with the runtime, with an optional activation override;
    a checkpoint (folder, or hub id fetched into huggingface_hub's cache) is converted to a temp packed file first,
    deleted when the context ends. ``engine="transformers"``: an HF checkpoint run by transformers' own model
    class instead (compare/reference.py), the independent reference. ``traced``: our runtime on its reference
    path in float32, as compare_models(trace=True) needs."""
    if engine not in ENGINES:
        raise CompareError(f"engine must be one of {ENGINES}, got {engine!r}")
    if engine == "transformers":
        from bitnet158.compare.reference import load_transformers
        from bitnet158.runtime.loader import resolve_device

        if activation is not None:
            raise CompareError("an activation override applies to the bitnet158 engine; transformers runs the "
                               "checkpoint as its config.json says")
        yield load_transformers(path, resolve_device(device))
        return
    p = Path(path)
    if p.is_dir() or (not p.exists() and is_hub_repo(path)):
        from bitnet158.converter.hf import convert_hf

        with tempfile.TemporaryDirectory(prefix="bitnet-compare-") as tmp:
            packed = Path(tmp) / "model.bin"
            logger.info("converting the checkpoint %s to a temporary packed file", path)
            # f32 floats: exact for any checkpoint's, so the comparison sees its values, not the bf16 default's rounding
            convert_hf(path, str(packed), dtype="f32", progress=False)
            yield _load(str(packed), device, activation, traced)
    else:  # a packed file or a GGUF, local or a hub file spec (org/name/file: open_source fetches it)
        yield _load(path, device, activation, traced)
