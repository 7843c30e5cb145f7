"""Benchmark shapes, named after the layers of real models."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Shape:
    """One benchmark problem: a model's layer (``K -> D``), ``M`` rows, ranks ``r``, ``r'``."""

    preset: str
    layer: str
    M: int
    K: int
    D: int
    r: int
    rl: int

    @property
    def label(self) -> str:
        return f"{self.layer} M={self.M} r={self.r} r'={self.rl}"

    @property
    def short(self) -> str:
        return f"{self.layer}\nM={self.M} r={self.r}/{self.rl}"

    @property
    def key(self) -> tuple:
        """The problem without its preset: the same layer in two presets is timed once."""
        return (self.layer, self.M, self.K, self.D, self.r, self.rl)


def _rank10(K: int, D: int) -> int:
    """The SALT paper's other rank setting: 10% of min(D, K)."""
    return max(1, round(0.1 * min(D, K)))


# Layers of real models: (name, tokens M, in K, out D). Token counts: ViT-B/16 at 224 px
# has 197 tokens per image (batch 16 here, 4 in --quick); SAM's ViT-L image encoder
# sees 64x64 = 4096 tokens per 1024 px image; LLaMA-7B prefill of 2048 tokens, decode
# of 1-16 sequences.
_VIT_B = [("ViT-B/16 attn qkv", 197 * 16, 768, 2304), ("ViT-B/16 MLP fc1", 197 * 16, 768, 3072)]
_SAM_L = [("SAM ViT-L attn qkv", 4096, 1024, 3072), ("SAM ViT-L MLP fc1", 4096, 1024, 4096)]
_LLAMA = [("LLaMA-7B q_proj", 2048, 4096, 4096), ("LLaMA-7B MLP up", 2048, 4096, 11008)]
# The layers on which `auto` must keep up with `reference` (>= 0.95x, fp32 on CPU):
# (name, K, D, r, r'), each at M in AUTO_TOKENS.
_AUTO_LAYERS = [("ViT-B 768->768", 768, 768, 64, 8), ("ViT-B MLP 768->3072", 768, 3072, 64, 8),
                ("LLM 4096->4096", 4096, 4096, 128, 16)]
AUTO_TOKENS = (16, 256, 1024, 4096)


def _with_ranks(preset, layers, lora_rank=8):
    """Each layer at r = 64 and r = 10% of min(D, K), r' = 8."""
    out = []
    for name, M, K, D in layers:
        for r in sorted({64, _rank10(K, D)}):
            out.append(Shape(preset, name, M, K, D, r, min(lora_rank, r)))
    return out


PRESETS: dict[str, list[Shape]] = {
    "vit-b16": _with_ranks("vit-b16", _VIT_B),
    "sam-vit-l": _with_ranks("sam-vit-l", _SAM_L),
    "llama7b": _with_ranks("llama7b", _LLAMA),
    "decode": [Shape("decode", "LLaMA-7B q_proj", M, 4096, 4096, 64, 8) for M in (1, 4, 16)]
    + [Shape("decode", "LLaMA-7B MLP up", 16, 4096, 11008, 64, 8)],
    # r' sweep as in the SALT paper's ablation (r' <= r), on SAM ViT-L attention.
    "lora-rank": [Shape("lora-rank", "SAM ViT-L attn qkv", 4096, 1024, 3072, r, rl)
                  for r, rl in [(64, 8), (64, 32), (64, 64), (256, 8), (256, 64), (256, 256)]],
    # Token sweep at one layer: where the kernel targets are set (M <= 512 and M = 8192).
    "tokens": [Shape("tokens", "LLaMA-7B q_proj", M, 4096, 4096, 64, 8) for M in (1, 16, 64, 512, 8192)],
    "auto-vs-reference": [Shape("auto-vs-reference", name, M, K, D, r, rl)
                          for name, K, D, r, rl in _AUTO_LAYERS for M in AUTO_TOKENS],
    # Small enough for a 2-core CPU in about 30 s idle, 1.5 min at load average 7 (the --quick default there).
    "quick": [Shape("quick", "ViT-B/16 attn qkv", 197 * 4, 768, 2304, 64, 8),
              Shape("quick", "ViT-B/16 MLP fc1", 197 * 4, 768, 3072, _rank10(768, 3072), 8),
              Shape("quick", "SAM ViT-L attn qkv", 1024, 1024, 3072, 64, 8),
              Shape("quick", "LLaMA-7B q_proj", 16, 4096, 4096, 64, 8)],
    # Seconds, for tests of the CLI itself.
    "smoke": [Shape("smoke", "tiny", 64, 96, 128, 16, 4), Shape("smoke", "tiny decode", 2, 96, 128, 16, 0)],
}
FULL_PRESETS = ["vit-b16", "sam-vit-l", "llama7b", "decode", "tokens", "lora-rank"]

# The baselines timed besides the SALT backends, per preset (default: both). The
# auto-vs-reference preset compares backends only: the official layer's rebuild would
# dominate its run time and say nothing about `auto`.
BASELINES = ("dense", "official")
PRESET_BASELINES = {"auto-vs-reference": ()}


def select_shapes(names) -> list[Shape]:
    """The shapes of the named presets, each problem once (first preset wins)."""
    shapes, seen = [], set()
    for s in (s for n in names for s in PRESETS[n]):
        if s.key not in seen:
            seen.add(s.key)
            shapes.append(s)
    return shapes


def preset_baselines(names) -> list[str]:
    """The baselines the named presets ask for (union, in BASELINES order)."""
    wanted = {b for n in names for b in PRESET_BASELINES.get(n, BASELINES)}
    return [b for b in BASELINES if b in wanted]
