"""Shared fixtures: configs composed exactly as the command line does, writing into tmp_path."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, open_dict

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


def compose_train(overrides: list[str], workdir: Path | None = None) -> DictConfig:
    """Compose conf/train.yaml with ``overrides``; outputs go under ``workdir`` when given."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    if workdir is not None:
        with open_dict(cfg):
            cfg.paths.log_dir = str(workdir / "logs")
            cfg.paths.checkpoint_dir = str(workdir / "checkpoints")
            cfg.trainer.enable_progress_bar = False
    return cfg


@pytest.fixture
def train_config(tmp_path):
    def make(*overrides: str) -> DictConfig:
        return compose_train(list(overrides), tmp_path)

    return make
