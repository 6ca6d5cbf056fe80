"""Gradient sets for benchmarks: the shapes training jobs really have."""

from __future__ import annotations

import torch


def gpt2_small_shapes(layers: int = 12) -> list[tuple[int, ...]]:
    """Parameter shapes of GPT-2 small (124M parameters with 12 layers)."""
    d, vocab, ctx = 768, 50257, 1024
    shapes: list[tuple[int, ...]] = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,),
                   (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return shapes + [(d,), (d,)]


def llama_7b_shapes(layers: int = 32) -> list[tuple[int, ...]]:
    """Parameter shapes of a LLaMA-7B-like model (6.74B parameters with 32 layers)."""
    d, ffn, vocab = 4096, 11008, 32000
    shapes: list[tuple[int, ...]] = [(vocab, d)]
    for _ in range(layers):
        shapes += [(d, d)] * 4 + [(ffn, d), (ffn, d), (d, ffn), (d,), (d,)]
    return shapes + [(d,), (vocab, d)]


def scenarios(quick: bool, device: str = "cpu") -> dict[str, list[tuple[tuple[int, ...],
                                                                        torch.dtype]]]:
    """name -> [(shape, dtype)]. ``quick`` shrinks the large sets to keep a run short.

    The CPU sets are issue #2's (10,000 small tensors, GPT-2 small, 4 x 64M, mixed); the GPU sets
    are sized for an 80 GB card (20,000 x 4,096, GPT-2 small, LLaMA-7B-like in bf16, 4 x 256M).
    """
    if device.startswith("cuda"):
        layers = 4 if quick else 32
        huge = 64_000_000 if quick else 256_000_000
        return {
            "many-small 20,000 x 4,096": [((4096,), torch.float32)] * 20_000,
            "GPT-2-small shapes (12 layers)": [(s, torch.float32) for s in gpt2_small_shapes()],
            f"LLaMA-7B-like bf16 ({layers} layers)": [(s, torch.bfloat16)
                                                      for s in llama_7b_shapes(layers)],
            f"huge 4 x {huge // 1_000_000}M": [((huge,), torch.float32)] * 4,
        }
    huge = 16_000_000 if quick else 64_000_000
    gpt2 = gpt2_small_shapes(3 if quick else 12)
    mixed = [(s, torch.bfloat16 if i % 2 else torch.float32) for i, s in enumerate(gpt2)]
    return {
        "many-small 10,000 x 1,000": [((1000,), torch.float32)] * 10_000,
        f"GPT-2-small shapes ({'3' if quick else '12'} layers)": [(s, torch.float32) for s in gpt2],
        f"huge 4 x {huge // 1_000_000}M": [((huge,), torch.float32)] * 4,
        "mixed fp32+bf16 (GPT-2 shapes)": mixed,
    }


def make_grads(spec, device: str = "cpu", seed: int = 0) -> list[torch.nn.Parameter]:
    """Parameters whose .grad is standard normal, one per (shape, dtype).

    The parameters' own data is one element broadcast to the shape: the ops under test read only
    ``.grad``, and a 7B-parameter set then costs its gradients' memory, not twice that.
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    params = []
    for shape, dtype in spec:
        p = torch.nn.Parameter(torch.zeros((), device=device, dtype=dtype).expand(shape))
        p.grad = torch.randn(shape, generator=gen, device=device, dtype=torch.float32).to(dtype)
        params.append(p)
    return params
