"""Config interpolations of our own, registered when the package is imported.

``${hidden_layers:32,3}`` becomes ``[32, 32, 32]``: a search can then tune the width and the
depth of the network as two numbers instead of one list.
"""

from __future__ import annotations

from omegaconf import ListConfig, OmegaConf

from purchasenet.errors import ConfigError


def hidden_layers(width: int, depth: int) -> ListConfig:
    """``depth`` hidden layers of ``width`` units each (a config node, so it resolves in place)."""
    width, depth = int(width), int(depth)
    if width < 1 or depth < 0:
        raise ConfigError(
            f"hidden_layers needs a width of at least 1 and a depth of at least 0, "
            f"got width {width} and depth {depth}"
        )
    return OmegaConf.create([width] * depth)


def register() -> None:
    OmegaConf.register_new_resolver("hidden_layers", hidden_layers, replace=True)
