"""``bitnet-convert``: HF checkpoint → packed file, random models of the published shapes, and inspection of packed
files."""

from __future__ import annotations

import logging
import sys
import time

import click
from bitnet158.converter.hf import FLOAT_DTYPES, convert_hf
from bitnet158.converter.random_model import EMBED_DTYPES, SHAPES, describe_shape, model_config, write_random_model
from bitnet158.formats import gguf
from bitnet158.formats.packed import describe
from bitnet158.formats.source import GGUF_MAGIC


def _fail(e: BaseException) -> None:
    """User errors end as one line on stderr and exit code 1, without a traceback."""
    click.echo(f"error: {e}", err=True)
    sys.exit(1)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Log what the converter does (skipped tensors, family, ...).")
def main(verbose: bool) -> None:
    """Convert BitNet b1.58 checkpoints to the bitnet158 packed format and inspect packed files."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


@main.command("hf-to-packed")
@click.argument("src")
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False), help="The packed file to write.")
@click.option("--revision", default=None, help="Hub branch, tag or commit (hub ids only).")
@click.option("--dtype", type=click.Choice(list(FLOAT_DTYPES)), default="bf16", show_default=True,
              help="dtype of the float tensors (embeddings, norms, an untied head).")
@click.option("--force", is_flag=True, help="Overwrite OUT if it exists.")
@click.option("--allow-pickle", is_flag=True,
              help="Read pytorch_model.bin (a pickle) when there are no safetensors, with torch.load(weights_only=True).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def hf_to_packed(src: str, out: str, revision: str | None, dtype: str, force: bool, allow_pickle: bool,
                 no_progress: bool) -> None:
    """Convert SRC (a local HF model folder or a hub id like org/name) into one packed file."""
    try:
        s = convert_hf(src, out, revision=revision, dtype=dtype, force=force, allow_pickle=allow_pickle,
                       progress=not no_progress)
    except (ValueError, OSError) as e:
        _fail(e)
    except KeyboardInterrupt:
        _fail(RuntimeError("interrupted; nothing was written"))
    kept = f", {s.kept_scaled_ternary} already ternary×c (kept c)" if s.kept_scaled_ternary else ""
    click.echo(f"wrote {s.out}\n"
               f"  family       {s.family} ({s.form} linear weights{kept})\n"
               f"  tensors      {s.tensors}\n"
               f"  parameters   {s.parameters:,} ({s.ternary_weights:,} ternary)\n"
               f"  bits/weight  {s.bits_per_ternary_weight:.4f} per ternary weight, scales included\n"
               f"  file size    {_human(s.file_size)} ({s.file_size:,} bytes)\n"
               f"  time         {s.seconds:.1f} s")


@main.command("inspect")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--verify", is_flag=True,
              help="Also check every tensor: its checksum (packed files) and its ternary codes and scales.")
def inspect(file: str, verify: bool) -> None:
    """Print a packed or GGUF file's config, tokenizer summary and tensor table."""
    try:
        with open(file, "rb") as f:
            is_gguf = f.read(4) == GGUF_MAGIC
        text = (gguf.describe if is_gguf else describe)(file, verify=verify)
    except (ValueError, OSError) as e:
        _fail(e)
    click.echo(text)


@main.command("random")
@click.argument("shape", type=click.Choice(list(SHAPES)))
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False), help="The packed file to write.")
@click.option("--layers", type=int, default=None, help="Decoder layers (default: the shape's).")
@click.option("--vocab", type=int, default=None, help="Vocabulary size (default: the shape's; at least 263).")
@click.option("--seed", type=click.IntRange(-(2**63), 2**64 - 1), default=0, show_default=True,  # torch's: 64 bits
              help="Seed of the weights: a seed gives the same weights on any machine (same torch).")
@click.option("--embed-dtype", type=click.Choice(list(EMBED_DTYPES)), default="bf16", show_default=True,
              help="dtype of the tied embedding.")
@click.option("--force", is_flag=True, help="Overwrite OUT if it exists.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def random_cmd(shape: str, out: str, layers: int | None, vocab: int | None, seed: int, embed_dtype: str, force: bool,
               no_progress: bool) -> None:
    """Write a random model of a published SHAPE (2b4t: microsoft/bitnet-b1.58-2B-4T; 1bitllm-large:
    1bitLLM/bitnet_b1_58-large) to a packed file, for benchmarks without a download. Its text is noise."""
    t0 = time.perf_counter()
    try:
        config = model_config(shape, layers, vocab)
        size = write_random_model(out, config, seed=seed, embed_dtype=embed_dtype, force=force, progress=not no_progress)
    except (ValueError, OSError) as e:
        _fail(e)
    except KeyboardInterrupt:
        _fail(RuntimeError("interrupted; nothing was written"))
    click.echo(f"wrote {out}\n  shape        {describe_shape(config)}\n  file size    {_human(size)} ({size:,} bytes)\n"
               f"  time         {time.perf_counter() - t0:.1f} s")


# GGUF export/import commands (converter/gguf_cli.py)
from bitnet158.converter.gguf_cli import COMMANDS as _GGUF_COMMANDS  # noqa: E402

for _cmd in _GGUF_COMMANDS:
    main.add_command(_cmd)


if __name__ == "__main__":
    main()
