"""`bitnet-compare A B`: run two models on the same token ids and report how far B is from A.

A and B are each a packed file or a GGUF (detected by magic), local or on the hub as org/name/file, or an HF
checkpoint, a folder or a hub id org/name (converted to a temp packed file). With --engine-a/--engine-b
transformers, that side must be an HF checkpoint and runs in transformers' own model class (compare/reference.py):
the independent reference for our converter and runtime together.
Exit codes: 0 ok, 1 an error (one `error: ...` line), 2 usage, 3 a --max-kl / --min-top1 / --max-ppl-diff
threshold was violated or --trace found the networks differ.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path

import click

from bitnet158.compare.core import ENGINES, compare_models, format_table, open_model
from bitnet158.compare.trace import TRACE_TOKENS
from bitnet158.runtime.cli import read_text
from bitnet158.runtime.cpu import keep_compile_cache

EXIT_THRESHOLD = 3
DEFAULT_PROMPT = "The capital of France is Paris. The capital of Germany is"


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("a")
@click.argument("b")
@click.option("--prompt", "-p", help="Text to compare on (default: a short sentence).")
@click.option("--text", "text_file", type=click.Path(exists=True, dir_okay=False), help="Read the text from FILE.")
@click.option("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available).")
@click.option("--max-kl", type=float, default=None, help="Fail (exit 3) when mean KL(A‖B) in nats exceeds X.")
@click.option("--min-top1", type=float, default=None, help="Fail (exit 3) when top-1 agreement (0..1) is below Y.")
@click.option("--max-ppl-diff", type=float, default=None,
              help="Fail (exit 3) when the perplexities differ by more than this fraction (|ppl_A / ppl_B - 1|).")
@click.option("--gen-tokens", type=click.IntRange(min=0), default=16, show_default=True,
              help="Greedy tokens each model generates to find where they diverge (0: skip).")
@click.option("--max-tokens", type=click.IntRange(min=1), default=1024, show_default=True,
              help="Compare at most this many tokens (fewer when the models' context holds fewer, with the "
                   "--gen-tokens).")
@click.option("--activation-a", type=click.Choice(["relu2", "silu"]), default=None,
              help="Override A's activation (GGUF files whose architecture mislabels it).")
@click.option("--activation-b", type=click.Choice(["relu2", "silu"]), default=None, help="Override B's activation.")
@click.option("--engine-a", type=click.Choice(ENGINES), default="bitnet158", show_default=True,
              help="What runs A: our runtime, or transformers' own model class on an HF checkpoint (the reference).")
@click.option("--engine-b", type=click.Choice(ENGINES), default="bitnet158", show_default=True,
              help="What runs B (--engine-a).")
@click.option("--trace", is_flag=True,
              help=f"Also compare every ternary linear's input over the first {TRACE_TOKENS} tokens, to tell int8 "
                   "rounding flips from a real difference, which fails (exit 3), as does a trace that leaves a "
                   "linear unchecked; our side then runs its reference path in fp32.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the table.")
@click.option("-v", "--verbose", is_flag=True, help="Log progress to stderr.")
def main(a, b, prompt, text_file, device, max_kl, min_top1, max_ppl_diff, gen_tokens, max_tokens, activation_a,
         activation_b, engine_a, engine_b, trace, as_json, verbose):
    """Compare model A with model B on the same token ids (A's tokenizer)."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s: %(message)s")
    if prompt is not None and text_file is not None:
        raise click.UsageError("give --prompt or --text, not both")
    if min_top1 is not None and not 0.0 <= min_top1 <= 1.0:  # (not, so that NaN fails too)
        raise click.UsageError("--min-top1 is a fraction between 0 and 1")
    if max_kl is not None and not max_kl >= 0.0:
        raise click.UsageError("--max-kl is a number of nats, 0 or more")
    if max_ppl_diff is not None and not max_ppl_diff >= 0.0:
        raise click.UsageError("--max-ppl-diff is a fraction, 0 or more")
    if text_file:
        text = read_text(Path(text_file).read_bytes, text_file)
    else:
        text = DEFAULT_PROMPT if prompt is None else prompt  # an empty --prompt is its own text (BOS alone)
    keep_compile_cache()  # the runtime's compiled CPU step, as bitnet-run keeps it
    try:
        with open_model(a, device=device, activation=activation_a, engine=engine_a, traced=trace) as ma, \
                open_model(b, device=device, activation=activation_b, engine=engine_b, traced=trace) as mb:
            res = compare_models(ma, mb, text, gen_tokens=gen_tokens, max_tokens=max_tokens, max_kl=max_kl,
                                 min_top1=min_top1, max_ppl_diff=max_ppl_diff, trace=trace)
    except (ValueError, OSError) as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
    if as_json:
        out = res.to_dict()
        out["a"], out["b"], out["engine_a"], out["engine_b"] = a, b, engine_a, engine_b
        # strict JSON: a non-finite figure (a model whose logits overflow) is null, not NaN or Infinity
        click.echo(json.dumps(_finite(out), allow_nan=False))
    else:
        click.echo(format_table(res, _named(a, engine_a), _named(b, engine_b)))
    if res.violations:
        sys.exit(EXIT_THRESHOLD)


def _finite(v):
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    return v


def _named(spec: str, engine: str) -> str:
    # a model's line in the table: the transformers engine is said, our runtime (the default) is not
    return f"{spec} (transformers)" if engine == "transformers" else spec


if __name__ == "__main__":
    main()
