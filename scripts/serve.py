"""Serve a trained checkpoint over HTTP; settings in conf/serve.yaml.

    python scripts/serve.py ckpt_path=checkpoints/<run>/best.ckpt port=8000
    python scripts/serve.py                      # newest checkpoints/**/best.ckpt
    LIT_SERVER_API_KEY=secret python scripts/serve.py host=0.0.0.0

Then ``POST /predict`` with one list per feature, for example
``{"browsing_time": [5.0, 30.0]}``; ``/docs`` shows the checkpoint's request schema.
"""

import hydra
from omegaconf import DictConfig, OmegaConf

from purchasenet.serving import run_server


@hydra.main(config_path="../conf", config_name="serve", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_server(OmegaConf.to_container(cfg, resolve=True))


if __name__ == "__main__":
    main()
