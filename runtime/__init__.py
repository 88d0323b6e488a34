"""BitNet b1.58 inference: ``from bitnet158.runtime import load``.

model = load("model.bin")                      # device: CUDA when available; dtype: bf16 on CUDA, f32 on CPU
model.logits([1, 2, 3])                        # fp32 [3, vocab], no BOS added
for piece in model.generate("Hello", max_new_tokens=32):
    print(piece, end="")
ppl, n = model.perplexity(open("wiki.txt").read(), ctx=512)
"""

from bitnet158.formats.config import ModelConfig
from bitnet158.runtime.api import BitNetModel
from bitnet158.runtime.loader import load

__all__ = ["BitNetModel", "ModelConfig", "load"]
