"""Train a purchase classifier from the Hydra configs in conf/.

    python scripts/train.py                                   # binary model, browsing minutes
    python scripts/train.py model=multiclass activation=relu  # four behaviour segments
    python scripts/train.py data=shoppers trainer.max_epochs=20
    python scripts/train.py --help                            # every group and option
"""

import sys

import hydra
from omegaconf import DictConfig

import purchasenet  # noqa: F401  (registers ${hidden_layers:...} before Hydra resolves)


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    from purchasenet.cli import run_training

    return run_training(cfg)


if __name__ == "__main__":
    sys.exit(main())
