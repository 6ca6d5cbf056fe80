"""Which parameters make up which layer, and in what order the layers sit in the network."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

GROUP_BY = ("module", "parameter")
_COMPILED = "_orig_mod"  # the attribute under which torch.compile's wrapper holds the module

_registrations = 0
_watching = False


def _count_registration(*_) -> None:  # must return None: a value would replace the new member
    global _registrations
    _registrations += 1


def watch_registrations() -> None:
    """Count every module and parameter registered from now on, in any module (torch's global
    registration hooks; installed once, the first time a caller needs it)."""
    global _watching
    if not _watching:
        torch.nn.modules.module.register_module_module_registration_hook(_count_registration)
        torch.nn.modules.module.register_module_parameter_registration_hook(_count_registration)
        _watching = True


def registrations() -> int:
    """How many modules and parameters were registered since :func:`watch_registrations`: a
    model that gains one (a new layer, a replaced weight) changes it."""
    return _registrations


def _plain_name(name: str) -> str:
    """A module's name without the segments torch.compile's wrapper adds."""
    if _COMPILED not in name:
        return name
    return ".".join(part for part in name.split(".") if part != _COMPILED)


def describe(module: torch.nn.Module) -> str:
    """What a module is, in a few characters: ``Linear(12->8)``, ``Conv2d(3->16, 3x3)``,
    ``Embedding(1000x64)``, ``LayerNorm(64)``, else its class name."""
    kind = type(module).__name__
    if isinstance(module, torch.nn.Linear):
        return f"{kind}({module.in_features}->{module.out_features})"
    if isinstance(module, torch.nn.modules.conv._ConvNd):
        size = "x".join(map(str, module.kernel_size))
        return f"{kind}({module.in_channels}->{module.out_channels}, {size})"
    if isinstance(module, (torch.nn.Embedding, torch.nn.EmbeddingBag)):
        return f"{kind}({module.num_embeddings}x{module.embedding_dim})"
    if isinstance(module, torch.nn.modules.batchnorm._NormBase):
        return f"{kind}({module.num_features})"
    if isinstance(module, (torch.nn.LayerNorm, torch.nn.GroupNorm)):
        shape = getattr(module, "normalized_shape", None) or (module.num_channels,)
        return f"{kind}({'x'.join(map(str, shape))})"
    return kind


@dataclass(frozen=True)
class LayerMap:
    """Parameters grouped into layers.

    ``names`` are the layers in forward (registration) order: ``names[0]`` is nearest the input.
    ``param_names[i]`` / ``params[i]`` belong to layer ``layer_of[i]``; ``layer_numel[k]`` counts
    the elements of layer ``k``. ``is_embedding`` marks embedding layers: only the rows a batch
    looks up get a gradient, so the dead and vanishing rules leave them alone. ``kinds`` says
    what each layer is (:func:`describe` of its module; with ``group_by="parameter"`` also the
    parameter's name), for reports.
    """

    names: list[str]
    param_names: list[str]
    params: list[torch.nn.Parameter]
    layer_of: list[int]
    layer_numel: list[int]
    is_embedding: list[bool]
    kinds: list[str]

    @classmethod
    def from_model(cls, model: torch.nn.Module, group_by: str = "module",
                   extra: Iterable[tuple[str, torch.Tensor]] = ()) -> LayerMap:
        """Group the parameters of ``model``, frozen ones included (they have no gradient until
        they are unfrozen, and a layer without a gradient is left out of that step's record).

        ``group_by="module"`` puts the parameters a module owns directly into one layer named
        after the module (``encoder.layers.3.mlp.fc1``); ``"parameter"`` makes every parameter
        its own layer (``encoder.layers.3.mlp.fc1.weight``). Names are those of the module a
        ``torch.compile`` wrapper holds (no ``_orig_mod.``). ``extra``: ``(name, parameter)``
        pairs not in the model (an optimizer's own parameters), each its own layer, after the
        model's.

        Example:
            >>> net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))
            >>> LayerMap.from_model(net).names
            ['0', '2']
        """
        if group_by not in GROUP_BY:
            raise ValueError(f"group_by must be one of {GROUP_BY}, got {group_by!r}")
        names: list[str] = []
        index: dict[str, int] = {}
        param_names, params, layer_of, param_numel, excluded = [], [], [], [], []
        kinds: list[str] = []
        seen: set[int] = set()

        def add(layer: str, full: str, p: torch.Tensor, embedding: bool, kind: str) -> None:
            if layer not in index:
                index[layer] = len(names)
                names.append(layer)
                excluded.append(embedding)
                kinds.append(kind)
            param_names.append(full)
            params.append(p)
            layer_of.append(index[layer])
            param_numel.append(p.numel())

        for module_name, module in model.named_modules():
            module_name = _plain_name(module_name)
            embedding = isinstance(module, (torch.nn.Embedding, torch.nn.EmbeddingBag))
            for pname, p in module.named_parameters(recurse=False):
                if id(p) in seen:  # shared parameters count once
                    continue
                seen.add(id(p))
                full = f"{module_name}.{pname}" if module_name else pname
                kind = describe(module)
                if group_by == "module":
                    add(module_name or "(root)", full, p, embedding, kind)
                else:
                    add(full, full, p, embedding, f"{kind} {pname}")
        for name, p in extra:
            if id(p) not in seen:
                seen.add(id(p))
                add(name, name, p, False, "optimizer-only parameter")
        if not params:
            raise ValueError("the model has no parameters")
        layer_numel = [0] * len(names)
        for i, n in zip(layer_of, param_numel):
            layer_numel[i] += n
        return cls(names, param_names, params, layer_of, layer_numel, excluded, kinds)

    def __len__(self) -> int:
        return len(self.names)

    @cached_property
    def embedding_mask(self) -> np.ndarray:
        """``is_embedding`` as a boolean array, for the detectors' vectorized rules."""
        return np.asarray(self.is_embedding, dtype=bool)
