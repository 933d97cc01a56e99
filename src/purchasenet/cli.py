"""Shared handling for the entry scripts: user errors end in one line and a non-zero status."""

from __future__ import annotations

import sys

from omegaconf import DictConfig
from omegaconf.errors import MissingMandatoryValue

from purchasenet.errors import user_error_in


def fail(message: str, status: int = 2) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(status)


def run_training(cfg: DictConfig) -> float | None:
    """Train and return the value sweepers optimise (validation accuracy, best epoch)."""
    from purchasenet.training import train

    try:
        metrics = train(cfg)
    except MissingMandatoryValue as error:
        fail(f"missing value for {error.full_key}: set it on the command line or in the config")
    except Exception as error:
        cause = user_error_in(error)
        if cause is None:
            raise
        fail(str(cause))
    return metrics.get("val/acc_best")
