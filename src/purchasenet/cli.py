"""Shared handling for the entry scripts: user errors end in one line and a non-zero status."""

from __future__ import annotations

import os
import shutil
import sys
import warnings
from pathlib import Path
from collections.abc import Iterator
from contextlib import contextmanager

from omegaconf import DictConfig, read_write
from omegaconf.errors import MissingMandatoryValue

from purchasenet.errors import user_error_in


def fail(message: str, status: int = 2) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(status)


def run_training(cfg: DictConfig) -> float | None:
    """Train and return the value sweepers optimise (validation accuracy, best epoch)."""
    from purchasenet.training import train

    try:
        with sweep_job_as_single_run():
            metrics = train(cfg)
    except MissingMandatoryValue as error:
        fail(f"missing value for {error.full_key}: set it on the command line or in the config")
    except Exception as error:
        cause = user_error_in(error) or _lightning_configuration_error(error)
        if cause is None:
            raise
        _discard_unused_job_folder()
        fail(str(cause))
    return metrics.get("val/acc_best")


def _discard_unused_job_folder() -> None:
    """Remove a single run's Hydra folder when the run stopped before writing anything to it
    beyond Hydra's own record of the config and an empty log."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.RUN:
        return
    folder = Path(HydraConfig.get().runtime.output_dir)
    if not folder.is_dir():
        return
    entries = list(folder.iterdir())
    unused = [
        entry.name == ".hydra" or (entry.suffix == ".log" and entry.stat().st_size == 0)
        for entry in entries
    ]
    if all(unused):
        shutil.rmtree(folder, ignore_errors=True)


def _lightning_configuration_error(error: BaseException) -> BaseException | None:
    """Lightning's own verdict on a setting (no GPU, fewer epochs than resumed, ...)."""
    seen = error
    while seen is not None:
        if type(seen).__name__ == "MisconfigurationException":
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _report_user_errors(action, cfg: DictConfig):
    try:
        return action(cfg)
    except MissingMandatoryValue as error:
        fail(f"missing value for {error.full_key}: set it on the command line, e.g. "
             f"{error.full_key}=...")
    except Exception as error:
        cause = user_error_in(error)
        if cause is None:
            raise
        fail(str(cause))


def print_warnings(caught: list[warnings.WarningMessage]) -> None:
    for warning in caught:
        print(f"warning: {warning.message}", file=sys.stderr)


def run_evaluation(cfg: DictConfig) -> None:
    """Print the checkpoint's metrics on a split of its own data, beside those from training."""
    from purchasenet.evaluation import evaluate_checkpoint

    def evaluate(cfg: DictConfig) -> None:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UserWarning)
            model, metrics, rows = evaluate_checkpoint(cfg.ckpt_path, cfg.split)
        print_warnings(caught)
        stored = model.metadata.get("test_metrics", {})
        print(f"Checkpoint {cfg.ckpt_path}\n{model.metadata.get('dataset')} ({model.task}), "
              f"{cfg.split} split of {rows:,} rows:")
        width = max(map(len, metrics), default=0)
        for key, value in metrics.items():
            at_training = f"   (training: {stored[key]:.4f})" if key in stored else ""
            print(f"  {key:<{width}} {value:.4f}{at_training}")

    _report_user_errors(evaluate, cfg)


def run_prediction(cfg: DictConfig) -> None:
    """Write the input CSV's rows with probability and prediction columns."""
    from purchasenet.predictions import predict_file

    def predict(cfg: DictConfig) -> None:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UserWarning)
            rows = predict_file(cfg.ckpt_path, cfg.input, cfg.output)
        print_warnings(caught)
        print(f"Scored {rows:,} rows of {cfg.input} with {cfg.ckpt_path}: wrote {cfg.output}")

    _report_user_errors(predict, cfg)


@contextmanager
def sweep_job_as_single_run() -> Iterator[None]:
    """Inside a sweep, run each job as if it were the only one, for multi-process strategies.

    Lightning starts the other processes by re-running the command line with
    ``hydra.run.dir``; left as is, each of them would run the whole sweep again. It also leaves
    its process group and its variables (ranks, port) behind, which the next job would take for
    a group already running.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        yield
        return

    hydra_cfg = HydraConfig.get()
    command_line, run_dir, environment = sys.argv, hydra_cfg.run.dir, dict(os.environ)
    sys.argv = [sys.argv[0], *hydra_cfg.overrides.task, "hydra.mode=RUN"]
    with read_write(hydra_cfg):
        hydra_cfg.run.dir = hydra_cfg.runtime.output_dir
    try:
        yield
    finally:
        distributed = sys.modules.get("torch.distributed")
        if distributed is not None and distributed.is_available() and distributed.is_initialized():
            distributed.destroy_process_group()
        os.environ.clear()
        os.environ.update(environment)
        sys.argv = command_line
        with read_write(hydra_cfg):
            hydra_cfg.run.dir = run_dir
