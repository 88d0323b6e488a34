"""`bitnet-convert packed-to-gguf` and `bitnet-convert gguf-to-packed` (registered on the group in converter/cli.py)."""

from __future__ import annotations

import logging
import sys

import click

from bitnet158.converter.gguf_convert import EXPORT_TYPES, gguf_to_packed, packed_to_gguf


def _fail(e: Exception) -> None:
    click.echo(f"error: {e}", err=True)
    sys.exit(1)


@click.command("packed-to-gguf")
@click.argument("src", type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False), help="GGUF file to write.")
@click.option("--type", "qtype", type=click.Choice(EXPORT_TYPES, case_sensitive=False), default="i2_s",
              show_default=True,
              help="i2_s: Microsoft bitnet.cpp (arch bitnet-b1.58 for relu², bitnet for SiLU); "
                   "tq2_0/tq1_0: upstream llama.cpp arch bitnet (SiLU models, rows multiple of 256).")
@click.option("--force", is_flag=True, help="Overwrite OUT if it exists.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def packed_to_gguf_cmd(src, out, qtype, force, quiet):
    """Export a packed file SRC to GGUF."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        s = packed_to_gguf(src, out, qtype=qtype, force=force, progress=not quiet)
    except (ValueError, OSError) as e:
        _fail(e)
    click.echo(f"wrote {s['path']}: {s['type'].upper()}, arch {s['arch']}, {s['tensors']} tensors, "
               f"{s['data_bytes'] / 1e6:.1f} MB of tensor data")
    if s["scale_tensors"]:
        click.echo(f"  {s['scale_tensors']} scales are not exact in f16: block scales are 1 and the f32 scales are in "
                   "blk.N.*.scale tensors (llama.cpp multiplies by them)")


@click.command("gguf-to-packed")
@click.argument("src")
@click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False), help="Packed file to write.")
@click.option("--activation", type=click.Choice(["relu2", "silu"]), default=None,
              help="Override the activation the GGUF architecture implies (Microsoft's converter labels 1bitLLM "
                   "models bitnet-b1.58 too).")
@click.option("--force", is_flag=True, help="Overwrite OUT if it exists.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def gguf_to_packed_cmd(src, out, activation, force, quiet):
    """Convert a GGUF (I2_S, TQ1_0, TQ2_0) to a packed file, codes and scales bit-exact.

    SRC: a GGUF file, or from the Hugging Face hub org/name/file.gguf, or org/name when the repository holds one
    GGUF (e.g. microsoft/bitnet-b1.58-2B-4T-gguf)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        s = gguf_to_packed(src, out, activation=activation, force=force, progress=not quiet)
    except (ValueError, OSError) as e:
        _fail(e)
    click.echo(f"wrote {s['path']}: {s['tensors']} tensors from GGUF arch {s['arch']}")


COMMANDS = (packed_to_gguf_cmd, gguf_to_packed_cmd)
