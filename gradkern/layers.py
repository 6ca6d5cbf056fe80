"""Which parameters make up which layer, and in what order the layers sit in the network."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

GROUP_BY = ("module", "parameter")


@dataclass(frozen=True)
class LayerMap:
    """Parameters grouped into layers.

    ``names`` are the layers in forward (registration) order: ``names[0]`` is nearest the input.
    ``param_names[i]`` / ``params[i]`` belong to layer ``layer_of[i]``; ``layer_numel[k]`` counts
    the elements of layer ``k``. ``is_embedding`` marks embedding layers: only the rows a batch
    looks up get a gradient, so the dead and vanishing rules leave them alone.
    """

    names: list[str]
    param_names: list[str]
    params: list[torch.nn.Parameter]
    layer_of: list[int]
    layer_numel: list[int]
    is_embedding: list[bool]

    @classmethod
    def from_model(cls, model: torch.nn.Module, group_by: str = "module") -> LayerMap:
        """Group the trainable parameters of ``model``.

        ``group_by="module"`` puts the parameters a module owns directly into one layer named
        after the module (``encoder.layers.3.mlp.fc1``); ``"parameter"`` makes every parameter
        its own layer (``encoder.layers.3.mlp.fc1.weight``).

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
        seen: set[int] = set()
        for module_name, module in model.named_modules():
            embedding = isinstance(module, (torch.nn.Embedding, torch.nn.EmbeddingBag))
            for pname, p in module.named_parameters(recurse=False):
                if not p.requires_grad or id(p) in seen:  # shared parameters count once
                    continue
                seen.add(id(p))
                full = f"{module_name}.{pname}" if module_name else pname
                layer = (module_name or "(root)") if group_by == "module" else full
                if layer not in index:
                    index[layer] = len(names)
                    names.append(layer)
                    excluded.append(embedding)
                param_names.append(full)
                params.append(p)
                layer_of.append(index[layer])
                param_numel.append(p.numel())
        if not params:
            raise ValueError("the model has no trainable parameters")
        layer_numel = [0] * len(names)
        for i, n in zip(layer_of, param_numel):
            layer_numel[i] += n
        return cls(names, param_names, params, layer_of, layer_numel, excluded)

    def __len__(self) -> int:
        return len(self.names)

    @cached_property
    def embedding_mask(self) -> np.ndarray:
        """``is_embedding`` as a boolean array, for the detectors' vectorized rules."""
        return np.asarray(self.is_embedding, dtype=bool)
