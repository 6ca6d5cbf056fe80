"""Small training set-ups with known gradient pathologies (and healthy ones to compare with).

The sick ones are the classic experiments from the literature on vanishing and exploding
gradients; the healthy ones are what the same networks look like with the usual remedies. The
tests calibrate the detectors on them (sick ones must fire, healthy ones must stay silent) and
the demo shows them diagnosed and fixed. Everything is seeded and CPU-sized (seconds).

Example:
    >>> import gradkern as gk
    >>> from gradkern.tools.cases import CASES, train
    >>> case = CASES["relu_regression_uniform_4_5"]()
    >>> mon = train(case, steps=20)
    >>> sorted({e.kind for e in mon.events})
    ['exploding', 'nonfinite']
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["Case", "CASES", "train", "two_moons"]


@dataclass
class Case:
    """A model, its optimizer, and a batch generator; ``loss(model, batch)`` is the objective."""

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    batch: Callable[[int], tuple]
    loss: Callable[[nn.Module, tuple], torch.Tensor]
    expected: tuple[str, ...]  # event kinds the detectors must report; () for a healthy case


def two_moons(n: int, noise: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Two interleaving half circles in 2-D, labels 0/1."""
    half = n // 2
    t = torch.rand(n, generator=gen) * math.pi
    upper = torch.stack([torch.cos(t[:half]), torch.sin(t[:half])], 1)
    lower = torch.stack([1 - torch.cos(t[half:]), 0.5 - torch.sin(t[half:])], 1)
    x = torch.cat([upper, lower]) + noise * torch.randn(n, 2, generator=gen)
    y = torch.cat([torch.zeros(half), torch.ones(n - half)])
    return x, y


def _mlp(widths: list[int], activation: type[nn.Module]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(widths) - 1):
        layers.append(nn.Linear(widths[i], widths[i + 1]))
        if i < len(widths) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)


def _moons_case(name: str, activation: type[nn.Module], init: str, expected) -> Case:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    x, y = two_moons(1000, 0.1, gen)
    model = _mlp([2, 8, 8, 8, 8, 1], activation)
    for m in model:
        if isinstance(m, nn.Linear):
            if init == "uniform":
                nn.init.uniform_(m.weight, -1.0, 1.0)
                nn.init.uniform_(m.bias, -1.0, 1.0)
            else:  # He init for ReLU
                nn.init.kaiming_uniform_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)
    opt = torch.optim.RMSprop(model.parameters(), lr=1e-3)

    def batch(step: int):
        idx = torch.randint(0, len(x), (64,), generator=gen)
        return x[idx], y[idx]

    def loss(m, b):
        return nn.functional.binary_cross_entropy_with_logits(m(b[0]).squeeze(1), b[1])

    return Case(name, model, opt, batch, loss, expected)


def sigmoid_mlp_two_moons() -> Case:
    """4 hidden sigmoid layers of 8 units, weights and biases uniform(-1, 1), RMSprop: the first
    layers' gradients are ~25x smaller than the last layer's."""
    return _moons_case("sigmoid_mlp_two_moons", nn.Sigmoid, "uniform", ("vanishing",))


def relu_mlp_two_moons() -> Case:
    """The same network with ReLU and He init: healthy."""
    return _moons_case("relu_mlp_two_moons", nn.ReLU, "he", ())


def relu_regression_uniform_4_5() -> Case:
    """15 features, one 35-unit ReLU layer initialised uniform(4, 5), SGD: NaN within steps."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(2)
    w_true = torch.randn(15, 1, generator=gen) * 10
    model = nn.Sequential(nn.Linear(15, 35), nn.ReLU(), nn.Linear(35, 1))
    nn.init.uniform_(model[0].weight, 4.0, 5.0)
    nn.init.uniform_(model[0].bias, 4.0, 5.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def batch(step: int):
        x = torch.randn(32, 15, generator=gen)
        return x, x @ w_true + 0.1 * torch.randn(32, 1, generator=gen)

    def loss(m, b):
        return nn.functional.mse_loss(m(b[0]), b[1])

    return Case("relu_regression_uniform_4_5", model, opt, batch, loss,
                ("exploding", "nonfinite"))


def tanh_chain(depth: int = 20, width: int = 32, scale: float = 0.5) -> Case:
    """``depth`` tanh layers with weights N(0, scale^2 / width): the gradient shrinks by about
    ``scale`` per layer on its way back."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(3)
    model = _mlp([width] * (depth + 1) + [1], nn.Tanh)
    for m in model:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, scale / math.sqrt(m.in_features))
            nn.init.zeros_(m.bias)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def batch(step: int):
        x = torch.randn(64, width, generator=gen)
        return x, x[:, :1].sin()

    def loss(m, b):
        return nn.functional.mse_loss(m(b[0]), b[1])

    expected = ("vanishing",) if scale < 1.0 else ()
    return Case(f"tanh_chain_{depth}x{scale}", model, opt, batch, loss, expected)


class TinyTransformer(nn.Module):
    def __init__(self, vocab: int = 256, d: int = 64, layers: int = 2, ctx: int = 32):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(ctx, d)
        block = nn.TransformerEncoderLayer(d, 4, 4 * d, dropout=0.0, batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(tokens.shape[1], device=tokens.device)
        # made on the tokens' device: a CPU mask would be copied every step, a host sync on a GPU
        mask = nn.Transformer.generate_square_subsequent_mask(tokens.shape[1], device=tokens.device)
        h = self.encoder(self.embed(tokens) + self.pos(pos), mask=mask, is_causal=True)
        return self.head(self.norm(h))


def small_transformer() -> Case:
    """A 2-block pre-norm transformer learning a fixed token pattern with AdamW: healthy."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(4)
    model = TinyTransformer()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    pattern = torch.randint(0, 256, (64,), generator=gen)

    def batch(step: int):
        start = torch.randint(0, 32, (16,), generator=gen)
        rows = torch.stack([pattern[s:s + 33] for s in start.tolist()])
        return rows[:, :-1], rows[:, 1:]

    def loss(m, b):
        logits = m(b[0])
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), b[1].reshape(-1))

    return Case("small_transformer", model, opt, batch, loss, ())


class _ResBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(h)))


def small_resnet() -> Case:
    """A 4-block residual CNN with batch norm classifying blurred random images: healthy."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(5)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
                          *[_ResBlock(16) for _ in range(4)],
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    prototypes = torch.randn(10, 3, 16, 16, generator=gen)

    def batch(step: int):
        y = torch.randint(0, 10, (32,), generator=gen)
        return prototypes[y] + 0.5 * torch.randn(32, 3, 16, 16, generator=gen), y

    def loss(m, b):
        return nn.functional.cross_entropy(m(b[0]), b[1])

    return Case("small_resnet", model, opt, batch, loss, ())


CASES: dict[str, Callable[[], Case]] = {
    "sigmoid_mlp_two_moons": sigmoid_mlp_two_moons,
    "relu_mlp_two_moons": relu_mlp_two_moons,
    "relu_regression_uniform_4_5": relu_regression_uniform_4_5,
    "tanh_chain_20x0.5": lambda: tanh_chain(20, scale=0.5),
    "tanh_chain_20x1.0": lambda: tanh_chain(20, scale=1.0),
    "small_transformer": small_transformer,
    "small_resnet": small_resnet,
}


def train(case: Case, steps: int, **monitor_kwargs):
    """Train ``case`` for ``steps`` optimizer steps under a Monitor; return the closed Monitor.

    ``monitor_kwargs`` go to :class:`gradkern.Monitor` (default ``log_every=1``).
    """
    from gradkern import Monitor

    monitor_kwargs.setdefault("log_every", 1)
    with Monitor(case.model, case.optimizer, **monitor_kwargs) as mon:
        for step in range(steps):
            case.optimizer.zero_grad()
            case.loss(case.model, case.batch(step)).backward()
            case.optimizer.step()
    return mon
