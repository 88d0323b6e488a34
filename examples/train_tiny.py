"""Train the tiny embedded BitNet b1.58 model shipped in examples/tiny-bitnet/.

The network is transformers' ``BitNetForCausalLM`` (the Microsoft 2B-4T architecture: relu², attn_sub_norm +
ffn_sub_norm, GQA, tied head, RMSNorm eps 1e-5) with every decoder linear swapped for a quantization-aware
``QATLinear``: latent fp32 weights, absmean-ternary weights and per-token int8 activations in the forward pass,
straight-through estimator in the backward pass. The forward is exactly what the runtime (and transformers'
online ``autobitlinear``) computes, so the saved latent weights run unchanged through both.

Data: the King James Version of the Bible (public domain), from the Debian packages ``bible-kjv-text`` (the
compressed text) and ``bible-kjv`` (the ``bible`` reader that decompresses it). ``--fetch-kjv DIR`` downloads both
with ``apt-get download`` (no root install needed) and writes DIR/kjv.txt. The book of Ruth is held out: it is never
trained on, and its first two chapters are shipped as examples/heldout.txt for the tests.

Usage (defaults = the run that produced the shipped checkpoint; see examples/MODEL_CARD.md)::

    python examples/train_tiny.py --fetch-kjv /tmp/kjv                     # once: writes /tmp/kjv/kjv.txt
    python examples/train_tiny.py --data /tmp/kjv/kjv.txt --out examples/tiny-bitnet    # 55 minutes on 2 cores
    python examples/train_tiny.py --plot examples/loss.png --log train_log.jsonl        # the loss curve

The shipped run stopped on the clock at step 6,350 of 7,000 after 55 minutes on the 2-core development VM
(0.38 s/step when idle, --threads 2); --device cuda runs the same maths in minutes. ``--minutes`` is a wall-clock stop: the learning rate follows a cosine over whichever of
--max-steps and --minutes runs out first, and a checkpoint is saved every --save-every-min minutes, so a stopped run
still leaves a usable model. Needs transformers (the ``test`` extra) and, for ``--plot`` only, matplotlib (not a
bitnet158 dependency).
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import click
import torch
import torch.nn.functional as F
from torch import nn

BOS, EOS, EOT = "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"
# The 2B-4T chat format: "User: {msg}<|eot_id|>Assistant: " with BOS once at the start.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% set content = message['role'] | capitalize + ': ' + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}"
)
HELDOUT_BOOK = "Ruth"  # the book of Ruth: never trained on
HELDOUT_SHIPPED_CHAPTERS = 2  # Ruth 1-2 go to examples/heldout.txt (about 6 KB)


# ----------------------------------------------------------------------------------------------------------- data


def fetch_kjv(dest: Path) -> Path:
    """Download the Debian KJV packages into ``dest`` and decompress the text to ``dest/kjv.txt``."""
    dest.mkdir(parents=True, exist_ok=True)
    for pkg in ("bible-kjv-text", "bible-kjv"):
        subprocess.run(["apt-get", "download", pkg], cwd=dest, check=True)
    for deb in dest.glob("*.deb"):
        subprocess.run(["dpkg", "-x", str(deb), str(dest / "root")], check=True)
    root = dest / "root"
    # `bible -f` turns pretty-printing off: one verse per line, "Ge1:1 In the beginning ...".
    out = subprocess.run(
        [str(root / "usr/bin/bible"), "-f", "-p", str(root / "usr/lib"), "gen1:1-rev22:21"],
        check=True, capture_output=True, text=True,
    ).stdout
    path = dest / "kjv.txt"
    path.write_text(out, encoding="utf-8")
    return path


VERSE = re.compile(r"^(\d?[A-Za-z]+)(\d+):(\d+) (.*)$")


def read_chapters(path: Path) -> list[tuple[str, int, str]]:
    """Parse ``bible -f`` output into (book, chapter, text) with the verses of a chapter joined by spaces."""
    chapters: dict[tuple[str, int], list[str]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        m = VERSE.match(line.strip())
        if m:
            chapters.setdefault((m.group(1), int(m.group(2))), []).append(m.group(4).strip())
    if len(chapters) < 1000:
        raise click.ClickException(f"{path}: parsed only {len(chapters)} chapters; expected `bible -f` output")
    return [(book, ch, " ".join(verses)) for (book, ch), verses in chapters.items()]


# ------------------------------------------------------------------------------------------------------ tokenizer


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE with Llama-3's pre-tokenizer regex and special tokens; the post-processor prepends BOS."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    llama3_split = (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
        r"|\s*[\r\n]+|\s+(?!\S)|\s+"
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(llama3_split), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS, EOT],  # ids 0, 1, 2
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1", special_tokens=[(BOS, bos_id)]
            ),
        ]
    )
    return tok


def save_tokenizer(tok, out: Path, ctx: int) -> None:
    """Write tokenizer.json + tokenizer_config.json (+ special_tokens_map) loadable by AutoTokenizer."""
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, model_max_length=ctx, chat_template=CHAT_TEMPLATE
    )
    hf.save_pretrained(str(out))
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    # "PreTrainedTokenizerFast" loads in transformers 4.x as well as 5.x (which would write "TokenizersBackend").
    cfg.update({"add_bos_token": True, "add_eos_token": False, "chat_template": CHAT_TEMPLATE,
                "tokenizer_class": "PreTrainedTokenizerFast"})
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")


# ------------------------------------------------------------------------------------------------------ the model


class QATLinear(nn.Linear):
    """nn.Linear whose forward is the b1.58 BitLinear (REFERENCE §2) with a straight-through estimator.

    Weights: m = max(mean|W|, 1e-5) (per tensor, fp32), W_q = m · clamp(round(W / m), -1, 1).
    Activations, per token over the last dim: s = 127 / max(max|x|, 1e-5), x_q = clamp(round(x · s), -128, 127) / s.
    The backward pass treats both quantizers as the identity.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        m = w.abs().mean().clamp(min=1e-5)
        w_q = w + ((w / m).round().clamp(-1, 1) * m - w).detach()
        s = 127.0 / x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)  # [..., 1]
        x_q = x + ((x * s).round().clamp(-128, 127) / s - x).detach()
        return F.linear(x_q, w_q)


def build_model(vocab: int, hidden: int, inter: int, layers: int, heads: int, kv_heads: int, ctx: int,
                bos_id: int, eos_id: int):
    """transformers BitNetForCausalLM (no quantization_config) with QATLinear in every decoder linear."""
    from transformers import BitNetConfig, BitNetForCausalLM

    config = BitNetConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, hidden_act="relu2", max_position_embeddings=ctx,
        rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=bos_id, eos_token_id=eos_id,
        attention_bias=False, use_cache=False,
    )
    model = BitNetForCausalLM(config)
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    q = QATLinear(child.in_features, child.out_features, bias=False)
                    q.weight = child.weight
                    setattr(parent, name, q)
    n_qat = sum(isinstance(m, QATLinear) for m in model.modules())
    assert n_qat == 7 * layers, n_qat  # q k v o gate up down
    model.tie_weights()
    return model


QUANT_CONFIG = {"quant_method": "bitnet", "linear_class": "autobitlinear", "quantization_mode": "online"}


def save_checkpoint(model, tok, out: Path, ctx: int, eot_id: int, meta: dict) -> None:
    """Save a standard HF checkpoint (fp32 latent weights, online autobitlinear) atomically into ``out``.

    The weights are saved in the dtype they were trained in (fp32, 13 MB for the default shape), so the shipped
    checkpoint ternarizes exactly as it did during training.
    """
    from transformers import BitNetForCausalLM

    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    try:
        cfg = model.config.to_dict()
        shipped = BitNetForCausalLM(type(model.config).from_dict(cfg))
        # The QAT linears keep the module names, so the state dicts line up one to one.
        shipped.load_state_dict(model.state_dict())
        shipped.config.use_cache = True
        shipped.generation_config.eos_token_id = [model.config.eos_token_id, eot_id]
        shipped.generation_config.bos_token_id = model.config.bos_token_id
        shipped.save_pretrained(str(tmp))
        # The latent weights are not quantized on disk; "online" makes transformers ternarize them at load time.
        cfg_path = tmp / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["quantization_config"] = QUANT_CONFIG
        cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
        save_tokenizer(tok, tmp, ctx)
        (tmp / "training_state.json").write_text(json.dumps(meta, indent=2) + "\n")
        tmp.chmod(0o755)  # mkdtemp makes it 0700
        for f in tmp.iterdir():
            f.chmod(0o644)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


# -------------------------------------------------------------------------------------------------------- training


@torch.no_grad()
def eval_loss(model, ids: torch.Tensor, ctx: int) -> float:
    """Mean next-token loss over ``ids`` in non-overlapping windows of ``ctx`` tokens."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(ids) - 1, ctx):
        chunk = ids[start : start + ctx + 1]
        if len(chunk) < 2:
            break
        logits = model(chunk[None, :-1]).logits[0]
        total += F.cross_entropy(logits.float(), chunk[1:], reduction="sum").item()
        count += len(chunk) - 1
    model.train()
    return total / count


def plot_losses(log_path: Path, png: Path) -> None:
    """Draw train/held-out loss from the JSON-lines log (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    tr = [(r["tokens"] / 1e6, r["train_loss"]) for r in rows if "train_loss" in r]
    va = [(r["tokens"] / 1e6, r["heldout_loss"]) for r in rows if "heldout_loss" in r]
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    ax.plot(*zip(*tr), lw=0.5, alpha=0.3, color="C0")
    k = max(1, len(tr) // 100)  # moving average over ~1 % of the run
    smooth = [(tr[i][0], sum(y for _, y in tr[i - k + 1 : i + 1]) / k) for i in range(k - 1, len(tr))]
    ax.plot(*zip(*smooth), lw=1.2, color="C0", label="train (QAT, moving average)")
    if va:
        ax.plot(*zip(*va), "o-", ms=2, color="C1", label="held-out (Ruth, never trained on)")
    ax.set_xlabel("training tokens (M)")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("tiny BitNet b1.58 on the KJV")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png)


@click.command()
@click.option("--fetch-kjv", "fetch_dir", type=click.Path(path_type=Path),
              help="Download the Debian KJV packages here, write kjv.txt and exit.")
@click.option("--data", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="kjv.txt from --fetch-kjv.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("examples/tiny-bitnet"), show_default=True)
@click.option("--heldout-out", type=click.Path(path_type=Path), default=Path("examples/heldout.txt"), show_default=True)
@click.option("--log", "log_path", type=click.Path(path_type=Path), default=Path("train_log.jsonl"), show_default=True)
@click.option("--plot", type=click.Path(path_type=Path), help="Only draw the loss curve from --log into this PNG.")
@click.option("--minutes", type=float, default=55.0, show_default=True, help="Wall-clock training budget.")
@click.option("--max-steps", type=int, default=7000, show_default=True)
@click.option("--vocab", type=int, default=2048, show_default=True)
@click.option("--hidden", type=int, default=256, show_default=True)
@click.option("--inter", type=int, default=704, show_default=True)
@click.option("--layers", type=int, default=4, show_default=True)
@click.option("--heads", type=int, default=8, show_default=True)
@click.option("--kv-heads", type=int, default=2, show_default=True)
@click.option("--ctx", type=int, default=256, show_default=True)
@click.option("--batch", type=int, default=8, show_default=True, help="Sequences per optimizer step.")
@click.option("--micro", type=int, default=8, show_default=True, help="Sequences per forward (grad accumulation).")
@click.option("--lr", type=float, default=1.5e-3, show_default=True)
@click.option("--min-lr-frac", type=float, default=0.1, show_default=True)
@click.option("--warmup", type=int, default=50, show_default=True)
@click.option("--weight-decay", type=float, default=0.05, show_default=True)
@click.option("--eval-every", type=int, default=50, show_default=True)
@click.option("--save-every-min", type=float, default=5.0, show_default=True)
@click.option("--threads", type=int, default=2, show_default=True)
@click.option("--device", default="cpu", show_default=True, help="torch device; the maths is the same on any.")
@click.option("--seed", type=int, default=0, show_default=True)
def main(fetch_dir, data, out, heldout_out, log_path, plot, minutes, max_steps, vocab, hidden, inter, layers, heads,
         kv_heads, ctx, batch, micro, lr, min_lr_frac, warmup, weight_decay, eval_every, save_every_min, threads,
         device, seed):
    """Train the tiny BitNet b1.58 example model (see the module docstring)."""
    if fetch_dir:
        click.echo(f"wrote {fetch_kjv(fetch_dir)}")
        return
    if plot:
        plot_losses(log_path, plot)
        click.echo(f"wrote {plot}")
        return
    if data is None:
        raise click.UsageError("give --data kjv.txt (make it with --fetch-kjv DIR)")
    if batch % micro:
        raise click.UsageError("--batch must be a multiple of --micro")
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    random.seed(seed)
    t_start = time.time()

    chapters = read_chapters(data)
    train_texts = [text for book, _, text in chapters if book != HELDOUT_BOOK]
    heldout = [text for book, _, text in chapters if book == HELDOUT_BOOK]
    # Shipped held-out text: Ruth 1-2, one chapter per paragraph.
    heldout_out.parent.mkdir(parents=True, exist_ok=True)
    heldout_out.write_text("\n\n".join(heldout[:HELDOUT_SHIPPED_CHAPTERS]) + "\n", encoding="utf-8")

    tok = train_tokenizer(train_texts, vocab)
    bos_id, eos_id, eot_id = (tok.token_to_id(t) for t in (BOS, EOS, EOT))
    # Each chapter is one document: BOS + text + EOS, concatenated into one stream.
    stream: list[int] = []
    for enc in tok.encode_batch(train_texts):
        stream.extend(enc.ids)
        stream.append(eos_id)
    train_ids = torch.tensor(stream, dtype=torch.long)
    heldout_ids = torch.tensor(tok.encode("\n\n".join(heldout)).ids, dtype=torch.long, device=device)
    click.echo(f"tokens: train {len(train_ids):,}, held-out {len(heldout_ids):,} (Ruth); vocab {tok.get_vocab_size()}")

    model = build_model(tok.get_vocab_size(), hidden, inter, layers, heads, kv_heads, ctx, bos_id, eos_id)
    model.to(device).train()
    n_params = sum(p.numel() for p in model.parameters())
    click.echo(f"parameters: {n_params:,} (tied head)")

    decay = [p for n, p in model.named_parameters() if p.ndim == 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]  # RMSNorm weights
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.95), eps=1e-8,
    )
    budget_s = minutes * 60.0

    def lr_at(step: int, elapsed: float) -> float:
        # Linear warmup, then cosine to min_lr over whichever runs out first: steps or the wall-clock budget.
        if step < warmup:
            return lr * (step + 1) / warmup
        frac = min(1.0, max(step / max_steps, elapsed / budget_s))
        return lr * (min_lr_frac + (1 - min_lr_frac) * 0.5 * (1 + math.cos(math.pi * frac)))

    meta = {"data": "KJV Bible, Debian bible-kjv-text 4.38 (Ruth held out)", "params": n_params}
    log = log_path.open("a")
    tokens_seen, step, last_save = 0, 0, time.time()
    t_train = time.time()
    gen = torch.Generator().manual_seed(seed)
    while step < max_steps and time.time() - t_train < budget_s:
        cur_lr = lr_at(step, time.time() - t_train)
        for g in opt.param_groups:
            g["lr"] = cur_lr
        loss_sum = 0.0
        for _ in range(batch // micro):
            # Random windows of ctx + 1 tokens from the stream: (micro, ctx + 1).
            starts = torch.randint(0, len(train_ids) - ctx - 1, (micro,), generator=gen)
            chunk = torch.stack([train_ids[s : s + ctx + 1] for s in starts.tolist()]).to(device)
            logits = model(chunk[:, :-1]).logits  # (micro, ctx, vocab)
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), chunk[:, 1:].reshape(-1))
            (loss * micro / batch).backward()
            loss_sum += loss.item() * micro / batch
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += batch * ctx
        row = {"step": step, "tokens": tokens_seen, "lr": cur_lr, "train_loss": loss_sum,
               "elapsed_s": round(time.time() - t_train, 1)}
        if step % eval_every == 0:
            row["heldout_loss"] = eval_loss(model, heldout_ids, ctx)
        log.write(json.dumps(row) + "\n")
        log.flush()
        if step % 10 == 0 or "heldout_loss" in row:
            click.echo(json.dumps(row))
        if time.time() - last_save > save_every_min * 60:
            save_checkpoint(model, tok, out, ctx, eot_id, {**meta, "step": step, "tokens": tokens_seen,
                                                           "train_minutes": (time.time() - t_train) / 60})
            last_save = time.time()
    final = eval_loss(model, heldout_ids, ctx)
    row = {"step": step, "tokens": tokens_seen, "heldout_loss": final, "elapsed_s": round(time.time() - t_train, 1)}
    log.write(json.dumps(row) + "\n")
    log.close()
    meta.update({"step": step, "tokens": tokens_seen, "train_minutes": (time.time() - t_train) / 60,
                 "heldout_loss_fp32": final, "heldout_ppl_fp32": math.exp(final), "threads": threads, "device": device,
                 "total_minutes": (time.time() - t_start) / 60})
    save_checkpoint(model, tok, out, ctx, eot_id, meta)
    click.echo(f"done: {step} steps, {tokens_seen:,} tokens, held-out ppl {math.exp(final):.2f} -> {out}")


if __name__ == "__main__":
    main()
