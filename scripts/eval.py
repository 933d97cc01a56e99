"""Evaluate a trained checkpoint on its own data, rebuilt from what the checkpoint holds.

    python scripts/eval.py ckpt_path=checkpoints/<run>/best.ckpt            # test split
    python scripts/eval.py ckpt_path=checkpoints/<run>/best.ckpt split=val
"""

import hydra
from omegaconf import DictConfig


@hydra.main(config_path="../conf", config_name="eval", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from purchasenet.cli import run_evaluation

    run_evaluation(cfg)


if __name__ == "__main__":
    main()
