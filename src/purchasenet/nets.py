"""The multilayer perceptron shared by training and serving (plain PyTorch, no Lightning)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import torch
from torch import nn

# Activations a checkpoint may name: only classes of torch.nn, never an arbitrary import path.
ACTIVATIONS = ("ReLU", "Sigmoid", "Tanh", "LeakyReLU", "GELU", "ELU", "SiLU", "SELU")
# Upper bounds on what a checkpoint may ask for, checked before any memory is allocated.
MAX_MEMBERS = 64
MAX_PARAMETERS = 50_000_000


def build_activation(spec: Mapping[str, Any]) -> nn.Module:
    """Build an activation from ``{"_target_": "torch.nn.ReLU", **kwargs}``."""
    target = str(spec.get("_target_", ""))
    class_name = target.removeprefix("torch.nn.modules.activation.").removeprefix("torch.nn.")
    if class_name not in ACTIVATIONS:
        allowed = ", ".join(f"torch.nn.{name}" for name in ACTIVATIONS)
        raise ValueError(f"activation._target_ must be one of {allowed}; got {target!r}")
    kwargs = {k: v for k, v in spec.items() if not k.startswith("_")}
    return getattr(nn, class_name)(**kwargs)


def stacked_layers(
    linear: Callable[[int, int], nn.Module],
    input_size: int,
    output_size: int,
    hidden_sizes: Sequence[int],
    activation: Mapping[str, Any],
    dropout: float,
) -> list[nn.Module]:
    """``linear(in, out)`` layers of the given hidden sizes, each followed by the activation
    and dropout, then the output layer."""
    layers: list[nn.Module] = []
    width = input_size
    for hidden in hidden_sizes:
        layers += [linear(width, int(hidden)), build_activation(activation)]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = int(hidden)
    layers.append(linear(width, output_size))
    return layers


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
        super().__init__(
            *stacked_layers(nn.Linear, input_size, output_size, hidden_sizes, activation, dropout)
        )

    def member_logits(self, inputs: torch.Tensor) -> torch.Tensor:
        """The logits as those of a one-member ensemble: (1, rows, outputs)."""
        return self(inputs).unsqueeze(0)

    @property
    def linear_layers(self) -> list[nn.Linear]:
        return [m for m in self if isinstance(m, nn.Linear)]


class BatchedLinear(nn.Module):
    """``members`` independent linear layers applied at once: (members, rows, in) → (…, out).

    Each member is initialised as :class:`torch.nn.Linear` would be, from its own draws. The
    weight is stored (members, in, out), the transpose of ``nn.Linear``'s, so that the product
    and its gradient need no transposed copy.
    """

    def __init__(self, members: int, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(members, in_features, out_features))
        self.bias = nn.Parameter(torch.empty(members, out_features))
        for member in range(members):
            layer = nn.Linear(in_features, out_features)
            with torch.no_grad():
                self.weight[member].copy_(layer.weight.T)
                self.bias[member].copy_(layer.bias)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias.unsqueeze(1), inputs, self.weight)

    def extra_repr(self) -> str:
        members = self.weight.shape[0]
        return f"members={members}, in={self.in_features}, out={self.out_features}"


class _Replicate(nn.Module):
    """Gives every member the same rows: (rows, in) → (members, rows, in), without a copy."""

    def __init__(self, members: int) -> None:
        super().__init__()
        self.members = members

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return inputs.unsqueeze(0).expand(self.members, *inputs.shape)


class _MemberMean(nn.Module):
    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.mean(dim=0)


class MLPEnsemble(nn.Sequential):
    """``members`` MLPs of one shape, trained side by side; the output is their mean logit.

    Every member starts from its own random weights and draws its own dropout masks, and its
    loss reaches only its own weights, so training them together equals training each alone
    on the same batches. :meth:`member_logits` gives the members' logits for that loss.
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        hidden_sizes: Sequence[int],
        activation: Mapping[str, Any],
        dropout: float = 0.0,
        members: int = 2,
    ) -> None:
        members = int(members)
        if not 1 <= members <= MAX_MEMBERS:
            raise ValueError(f"members must be between 1 and {MAX_MEMBERS}, got {members}")
        linear = partial(BatchedLinear, members)
        super().__init__(
            _Replicate(members),
            *stacked_layers(linear, input_size, output_size, hidden_sizes, activation, dropout),
            _MemberMean(),
        )
        self.members = members

    def member_logits(self, inputs: torch.Tensor) -> torch.Tensor:
        """Logits of every member: (members, rows, outputs)."""
        values = inputs
        for module in list(self)[:-1]:
            values = module(values)
        return values

    @property
    def linear_layers(self) -> list[BatchedLinear]:
        return [m for m in self if isinstance(m, BatchedLinear)]


def build_net(config: Mapping[str, Any]) -> MLP | MLPEnsemble:
    """The network a checkpoint describes: one MLP, or an ensemble when ``members`` > 1."""
    config = dict(config)
    members = int(config.pop("members", 1))
    widths = [config["input_size"], *config["hidden_sizes"], config["output_size"]]
    if not all(isinstance(width, int) and width > 0 for width in widths):
        raise ValueError(f"layer widths must be positive whole numbers, got {widths}")
    parameters = members * sum((a + 1) * b for a, b in zip(widths, widths[1:]))
    if parameters > MAX_PARAMETERS:
        raise ValueError(
            f"the network would hold {parameters:,} parameters, more than {MAX_PARAMETERS:,}"
        )
    if members == 1:
        return MLP(**config)
    return MLPEnsemble(**config, members=members)
