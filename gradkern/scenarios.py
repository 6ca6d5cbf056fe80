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


def scenarios(quick: bool) -> dict[str, list[tuple[tuple[int, ...], torch.dtype]]]:
    """name -> [(shape, dtype)]. ``quick`` shrinks the large sets to keep a run short."""
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
    """Parameters whose .grad is standard normal, one per (shape, dtype)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    params = []
    for shape, dtype in spec:
        p = torch.nn.Parameter(torch.empty(shape, device=device, dtype=dtype))
        p.grad = torch.randn(shape, generator=gen, device=device, dtype=torch.float32).to(dtype)
        params.append(p)
    return params
