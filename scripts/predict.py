"""Score the rows of a CSV file with a trained checkpoint.

    python scripts/predict.py ckpt_path=checkpoints/<run>/best.ckpt input=visits.csv \
        output=scored.csv
"""

import hydra
from omegaconf import DictConfig


@hydra.main(config_path="../conf", config_name="predict", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from purchasenet.cli import run_prediction

    run_prediction(cfg)


if __name__ == "__main__":
    main()
