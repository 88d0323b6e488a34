"""``bitnet-run``: generate text from, or measure the perplexity of, a BitNet b1.58 model file."""

from __future__ import annotations

import resource
import sys
import time

import click
import torch
from click.core import ParameterSource

from bitnet158.runtime.generate import ContextOverflowError, GenerationStats
from bitnet158.runtime.sampling import SEED_MAX, SEED_MIN
from bitnet158.runtime.tokenizer import TokenizerError

# --threads' bound: OpenMP fails to start (or crashes) far above any machine's cores, e.g. at 16,384
MAX_THREADS = 1024


def _peak_memory(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**20:.1f} MiB (CUDA max allocated)"
    # ru_maxrss is in KiB on Linux
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.1f} MiB (peak RSS)"


def _print_stats(model, stats: GenerationStats, load_s: float) -> None:
    lines = [
        f"load time:        {load_s:.2f} s ({model.device}, {str(model.dtype).replace('torch.', '')})",
        f"prompt tokens:    {stats.prompt_tokens}"
        + (f" ({stats.truncated_tokens} truncated)" if stats.truncated_tokens else ""),
        f"generated tokens: {stats.generated_tokens} (stopped: {stats.stop_reason})",
        *([f"warm-up:          {stats.warmup_s:.2f} s (compiling, or loading compiled kernels from the cache)"]
          if stats.warmup_s else []),
        f"prefill:          {stats.prefill_tok_s:.1f} tok/s",
        f"decode:           {stats.decode_tok_s:.1f} tok/s",
        f"peak memory:      {_peak_memory(model.device)}",
        f"resident weights: {model.resident_weight_bytes() / 2**20:.1f} MiB",
        f"path:             {stats.path}",
    ]
    click.echo("\n" + "\n".join(lines), err=True)


def _read_message() -> str | None:
    # one line of input, None at its end. On a terminal, input() with line editing and history (readline);
    # otherwise the marker goes to stderr, so that stdout holds only the replies.
    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401  (importing it gives input() line editing)
        except ImportError:
            pass
        try:
            return input("> ")
        except EOFError:
            return None
    click.echo("> ", nl=False, err=True)
    line = sys.stdin.readline()
    return line.rstrip("\r\n") if line else None  # a CRLF file's \r is not part of the message


def _chat_loop(model, system: str | None, max_new_tokens: int | None, sampling: dict, quiet: bool) -> None:
    # one user message a line from stdin; each reply streams to stdout, the prompt marker and a stats line go to
    # stderr. The conversation drops its oldest turns when it outgrows the context (BitNetModel.fit_chat). Ctrl-C
    # during a reply stops the reply; at the prompt it ends the chat (main's handler).
    if not model.tokenizer.chat_template:
        click.echo("error: this model file carries no chat template; give it a --prompt to continue instead", err=True)
        sys.exit(1)
    start = [{"role": "system", "content": system}] if system is not None else []
    messages = list(start)
    n = model.chat_reply_tokens(max_new_tokens)
    if not quiet:
        click.echo("chat: one message a line; /reset forgets the conversation, /exit or Ctrl-D ends", err=True)
    while True:
        text = _read_message()
        if text is None or text.strip() in ("/exit", "/quit"):
            click.echo(err=True)
            return
        if text.strip() == "/reset":
            messages = list(start)
            continue
        if not text.strip():
            continue
        try:
            # when turns must go, a quarter of the context more goes too: the next turns then reuse the cache
            slack = model.config.max_position_embeddings // 4
            messages = model.fit_chat([*messages, {"role": "user", "content": text}], n, slack)
        except (ContextOverflowError, TokenizerError) as e:  # this message cannot go: the chat goes on
            click.echo(f"error: {e}", err=True)
            continue
        stats = GenerationStats()
        reply = ""
        try:
            for piece in model.chat(messages, n, stats=stats, **sampling):
                click.echo(piece, nl=False)
                sys.stdout.flush()
                reply += piece
        except KeyboardInterrupt:  # Ctrl-C ends this reply (kept as far as it got), not the chat
            stats.stop_reason = "interrupted"
        click.echo()
        messages.append({"role": "assistant", "content": reply})
        if not quiet:
            click.echo(
                f"[{stats.generated_tokens} tokens, {stats.decode_tok_s:.1f} tok/s; prompt "
                f"{stats.prompt_tokens - stats.cached_tokens} run + {stats.cached_tokens} cached]",
                err=True,
            )


# what only a generation uses (--perplexity takes none of them; --ctx and --stride are only its)
_GENERATION_OPTIONS = ("chat", "max_new_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed",
                       "stop", "truncate")


def read_text(read, name: str) -> str:
    """``read()``: a text file's bytes, as its own characters (a CRLF stays CRLF, as llama.cpp reads it: text mode
    would score or continue another text), or one error line (exit 1) naming ``name`` when they are not UTF-8
    (bitnet-run's prompt and perplexity files, bitnet-compare's --text)."""
    try:
        return read().decode("utf-8")
    except UnicodeDecodeError as e:
        click.echo(f"error: {name} is not UTF-8 text (byte {e.start}: {e.reason})", err=True)
        sys.exit(1)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("file", type=click.Path())  # a folder or a hub spec: open_source's own messages and fetching
@click.option("--prompt", "-p", help="Text to continue (or, with --chat, the user message).")
@click.option(
    "--prompt-file",
    "-f",
    type=click.File("rb"),
    help="Read the prompt from this file ('-': standard input) instead of --prompt.",
)
@click.option(
    "--chat",
    is_flag=True,
    help="Wrap the prompt in the chat template carried in the file. Without --prompt: an interactive chat "
    "(one message a line; /reset forgets the conversation, /exit or end of input ends it).",
)
@click.option("--system", help="With --chat: a system message first.")
@click.option(
    "--max-new-tokens",
    "-n",
    type=click.IntRange(min=1),
    help="Default: 256, or fewer when the context has less room left (half of it when --truncate must cut the "
    "prompt).",
)
@click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(min=0), help="0 = greedy.")
@click.option("--top-k", default=0, show_default=True, type=click.IntRange(min=0), help="0 = off.")
@click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(0, 1, min_open=True), help="1 = off.")
@click.option(
    "--min-p",
    default=0.0,
    show_default=True,
    type=click.FloatRange(0, 1),
    help="Drop tokens below this fraction of the top token's probability (llama.cpp's min-p); 0 = off.",
)
@click.option("--repetition-penalty", default=1.0, show_default=True, type=click.FloatRange(min=0, min_open=True))
@click.option("--seed", type=click.IntRange(SEED_MIN, SEED_MAX), help="Seed for sampling (temperature > 0).")
@click.option("--stop", multiple=True, help="Stop when this text is generated (not printed); repeatable.")
@click.option("--device", help="cpu, cuda or cuda:N (default: cuda when available, else cpu).")
@click.option("--dtype", type=click.Choice(["bf16", "f16", "f32"]), help="Default: bf16 on cuda, f32 on cpu.")
@click.option("--force-fp16", is_flag=True, help="Allow f16 with relu² activations (it overflows).")
@click.option(
    "--cache-unpacked",
    is_flag=True,
    help="With --reference: keep unpacked weights resident (more memory; a faster reference prefill).",
)
@click.option(
    "--reference",
    is_flag=True,
    help="Force the pure-torch reference path (default: triton on CUDA, the compiled CPU step on the CPU).",
)
@click.option(
    "--compile/--no-compile",
    "compile_cpu",
    default=None,
    help="CPU: run decode steps as torch.compile'd kernels (default: for models of 100M+ ternary weights).",
)
@click.option(
    "--head",
    type=click.Choice(["bf16", "int8"]),
    default="bf16",
    show_default=True,
    help="Output head precision; int8 (per-row scales) needs a fast path: CUDA, or the compiled CPU path (which it "
    "turns on).",
)
@click.option(
    "--activation",
    type=click.Choice(["relu2", "silu"]),
    help="Override the activation the file records (Microsoft's GGUF converter labels 1bitLLM SiLU models "
    "bitnet-b1.58, which reads as relu²).",
)
@click.option("--truncate", is_flag=True, help="Drop the oldest prompt tokens (not a leading BOS) when prompt + "
              "generation overflow the context.")
@click.option("--threads", type=click.IntRange(1, MAX_THREADS), help="CPU threads for torch (default: torch's choice).")
@click.option("--quiet", "-q", is_flag=True, help="No statistics on stderr.")
@click.option("--perplexity", "ppl_file", type=click.Path(dir_okay=False), help="Score this text file instead.")
@click.option("--ctx", type=click.IntRange(min=2), help="Perplexity window (default: the model context).")
@click.option("--stride", type=click.IntRange(min=1), help="Perplexity window step (default: ctx // 2).")
def main(
    file,
    prompt,
    prompt_file,
    chat,
    system,
    max_new_tokens,
    temperature,
    top_k,
    top_p,
    min_p,
    repetition_penalty,
    seed,
    stop,
    device,
    dtype,
    force_fp16,
    cache_unpacked,
    reference,
    compile_cpu,
    head,
    activation,
    truncate,
    threads,
    quiet,
    ppl_file,
    ctx,
    stride,
):
    """Run the BitNet b1.58 model in FILE (a bitnet158 packed file, or a GGUF: I2_S, TQ1_0, TQ2_0), local or from
    the Hugging Face hub as org/name/file, or org/name for a repository with one GGUF.

    Sampling applies the repetition penalty, the temperature, top-k, top-p and min-p in that order, with
    transformers' arithmetic."""
    from bitnet158.runtime.cpu import keep_compile_cache  # these imports here keep `bitnet-run --help` fast
    from bitnet158.runtime.loader import load

    if prompt_file is not None:
        if prompt is not None:
            click.echo("error: give --prompt or --prompt-file, not both", err=True)
            sys.exit(2)
        prompt = read_text(prompt_file.read, getattr(prompt_file, "name", "<stdin>"))  # (a binary stdin may have none)
    interactive = chat and prompt is None and ppl_file is None
    if (prompt is None) == (ppl_file is None) and not interactive:
        click.echo("error: give exactly one of --prompt (or -f) or --perplexity (or --chat alone, to chat)", err=True)
        sys.exit(2)
    if system is not None and not chat:
        click.echo("error: --system needs --chat", err=True)
        sys.exit(2)
    # options the chosen job would not use are an error, not silently dropped
    source = click.get_current_context().get_parameter_source
    given = [n for n in ("ctx", "stride", *_GENERATION_OPTIONS) if source(n) is ParameterSource.COMMANDLINE]
    unused = [n for n in given if (n in _GENERATION_OPTIONS) == (ppl_file is not None)]
    why = "not for --perplexity, which scores a text and generates nothing" if ppl_file else "only for --perplexity"
    if not unused and interactive and "truncate" in given:
        unused, why = ["truncate"], "not for an interactive chat, which drops its oldest turns itself"
    if not unused and temperature == 0:
        unused = [n for n in ("top_k", "top_p", "min_p", "seed") if n in given]
        why = "only for sampling (--temperature > 0); at 0 the output is greedy"
    if unused:
        flags = ", ".join("--" + n.replace("_", "-") for n in unused)
        click.echo(f"error: {flags}: {why}", err=True)
        sys.exit(2)
    if threads:
        torch.set_num_threads(threads)
    keep_compile_cache()
    try:
        if ppl_file is not None:  # read first: a missing or non-UTF-8 text fails before the model loads
            with open(ppl_file, "rb") as f:
                text = read_text(f.read, ppl_file)
        t0 = time.perf_counter()
        model = load(
            file, device=device, dtype=dtype, cache_unpacked=cache_unpacked, force=force_fp16, reference=reference,
            head=head, activation=activation, compile_cpu=compile_cpu,
        )  # fmt: skip
        load_s = time.perf_counter() - t0
        if ppl_file is not None:
            ppl, n = model.perplexity(text, ctx=ctx, stride=stride, progress=not quiet)
            click.echo(f"perplexity: {ppl:.4f} over {n} tokens")
            return
        sampling = dict(temperature=temperature, top_k=top_k or None, top_p=top_p, min_p=min_p or None,
                        repetition_penalty=repetition_penalty, seed=seed, stop=list(stop))  # fmt: skip
        if interactive:
            _chat_loop(model, system, max_new_tokens, sampling, quiet)
            return
        stats = GenerationStats()
        pieces = model.generate(
            prompt, max_new_tokens=max_new_tokens, chat=chat, system=system, truncate=truncate, stats=stats, **sampling
        )
        for piece in pieces:
            click.echo(piece, nl=False)
            sys.stdout.flush()
        click.echo()
        if not quiet:
            _print_stats(model, stats, load_s)
    except (ValueError, OSError) as e:
        # ValueError subclasses are our "bad input" errors (file format, config, device, context, sampling)
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("\ninterrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
