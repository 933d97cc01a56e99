"""The multilayer perceptron shared by training and serving (plain PyTorch, no Lightning)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

# Activations a checkpoint may name: only classes of torch.nn, never an arbitrary import path.
ACTIVATIONS = ("ReLU", "Sigmoid", "Tanh", "LeakyReLU", "GELU", "ELU", "SiLU", "SELU")


def build_activation(spec: Mapping[str, Any]) -> nn.Module:
    """Build an activation from ``{"_target_": "torch.nn.ReLU", **kwargs}``."""
    target = str(spec.get("_target_", ""))
    class_name = target.removeprefix("torch.nn.modules.activation.").removeprefix("torch.nn.")
    if class_name not in ACTIVATIONS:
        allowed = ", ".join(f"torch.nn.{name}" for name in ACTIVATIONS)
        raise ValueError(f"activation._target_ must be one of {allowed}; got {target!r}")
    kwargs = {k: v for k, v in spec.items() if not k.startswith("_")}
    return getattr(nn, class_name)(**kwargs)


class MLP(nn.Sequential):
    """Linear layers of the given hidden sizes, each followed by the activation and dropout."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        hidden_sizes: Sequence[int],
        activation: Mapping[str, Any],
        dropout: float = 0.0,
    ) -> None:
        layers: list[nn.Module] = []
        width = input_size
        for hidden in hidden_sizes:
            layers += [nn.Linear(width, int(hidden)), build_activation(activation)]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = int(hidden)
        layers.append(nn.Linear(width, output_size))
        super().__init__(*layers)

    @property
    def linear_layers(self) -> list[nn.Linear]:
        return [m for m in self if isinstance(m, nn.Linear)]
