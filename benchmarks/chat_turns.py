"""A multi-turn conversation with and without reusing the KV cache between turns (``generate_ids(reuse_cache=)``).

    python benchmarks/chat_turns.py MODEL.bin [--turns 6] [--user 48] [--reply 32] [--device cpu|cuda]

Token level, so any file works (random ones carry no chat template): turn t's prompt is everything so far (the
previous prompts and replies) plus ``--user`` new random ids, and the model replies with ``--reply`` greedy ids.
Both modes run the same conversation in one process, turn by turn in alternation; per turn it prints the prompt
length, the tokens the prefill ran, and the time to the first reply token (prefill s) of each mode, and checks
that both modes replied with the same ids (they may differ only by float rounding: reused keys and values came
partly from decode steps).
"""

from __future__ import annotations

import argparse

import torch


def main() -> None:
    from bitnet158.runtime import load
    from bitnet158.runtime.generate import GenerationStats

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--user", type=int, default=48, help="new ids per user turn")
    ap.add_argument("--reply", type=int, default=32, help="greedy ids per reply")
    ap.add_argument("--device")
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    models = {"reuse": load(args.model, device=args.device), "no reuse": load(args.model, device=args.device)}
    vocab = models["reuse"].config.vocab_size
    conv = {name: [] for name in models}
    print(f"{args.model}, {models['reuse'].device}, path {models['reuse'].backend}")
    print("| turn | prompt tokens | run (reuse) | prefill s, reuse | prefill s, no reuse | same reply |")
    print("|---|---|---|---|---|---|")
    ctx = models["reuse"].config.max_position_embeddings
    for turn in range(1, args.turns + 1):
        if len(conv["reuse"]) + args.user + args.reply > ctx:  # the next turn would not fit the context
            print(f"(stopped before turn {turn}: {len(conv['reuse'])} + {args.user} + {args.reply} tokens exceed the "
                  f"model's context of {ctx})")
            break
        user = torch.randint(100, vocab, (args.user,), generator=gen).tolist()
        row = {}
        for name, model in models.items():
            conv[name] += user
            stats = GenerationStats()
            reply = list(model.generate_ids(conv[name], args.reply, stop_ids=(), stats=stats,
                                            reuse_cache=name == "reuse"))  # fmt: skip
            row[name] = (stats, reply)
            conv[name] += reply
        (s_r, a), (s_n, b) = row["reuse"], row["no reuse"]
        ran = s_r.prompt_tokens - s_r.cached_tokens
        print(f"| {turn} | {s_r.prompt_tokens} | {ran} | {s_r.prefill_s:.3f} | {s_n.prefill_s:.3f} | {a == b} |")
        conv["no reuse"] = list(conv["reuse"])  # keep one conversation if a reply differed


if __name__ == "__main__":
    main()
