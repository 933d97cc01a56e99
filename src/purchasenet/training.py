"""Train one classifier from a composed config, test its best checkpoint, report where it went."""

from __future__ import annotations

import logging
import os
import time
import warnings
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from purchasenet.calibration import calibrate, log_reliability_diagram, update_bundle
from purchasenet.errors import ConfigError
from purchasenet.inference import BUNDLE_KEY, read_checkpoint

log = logging.getLogger(__name__)

RUN_NAME_ENV = "PURCHASENET_RUN_NAME"


def activation_name(activation: DictConfig | dict) -> str:
    return str(activation["_target_"]).rsplit(".", 1)[-1].lower()


def resolve_run_name(cfg: DictConfig) -> str:
    """The run's folder name, unique under logs/ and checkpoints/.

    Child processes of a multi-process strategy inherit the name through the environment,
    so every process writes into the same run. Only a process Lightning started for another
    device reads it, so the next run of a sweep in the same process gets a name of its own.
    A run resumed from a checkpoint in ``checkpoints/<run>/`` continues in that run's folders;
    one resumed from a file elsewhere keeps the name stored in it, or, if a run of that name
    exists already, gets a new one, so that it never writes into a run it did not come from.
    """
    if cfg.get("run_name"):
        return str(cfg.run_name)
    if os.environ.get(RUN_NAME_ENV) and int(os.environ.get("LOCAL_RANK", "0")) > 0:
        return os.environ[RUN_NAME_ENV]
    base = None
    if cfg.get("ckpt_path"):
        stored = read_checkpoint(cfg.ckpt_path)[BUNDLE_KEY].get("run_name")
        folder = Path(cfg.ckpt_path).resolve().parent
        if folder.parent == Path(cfg.paths.checkpoint_dir).resolve():
            return folder.name
        base = f"{stored}-resumed" if stored else None
        if stored and not _run_exists(cfg, str(stored)):
            return str(stored)
    if base is None:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        base = f"{cfg.data.name}-{cfg.model.name}-{activation_name(cfg.activation)}-{stamp}"
    name, suffix = base, 1
    while _run_exists(cfg, name):
        suffix += 1
        name = f"{base}-{suffix}"
    return name


def _run_exists(cfg: DictConfig, name: str) -> bool:
    return (Path(cfg.paths.log_dir) / name).exists() or (
        Path(cfg.paths.checkpoint_dir) / name
    ).exists()


# Data settings that change only how rows are batched, which a resumed run may change.
BATCHING_KEYS = ("batch_size", "eval_batch_size", "chunk_batches")


def check_resume(cfg: DictConfig, model) -> None:
    """Refuse to continue a checkpoint with another network or other data, naming what differs.

    Resuming loads the weights into the configured network and then calibrates and tests the
    best checkpoint with it; a network or data set other than the one the weights were trained
    with would write wrong calibration and metrics into that checkpoint.
    """
    bundle = read_checkpoint(cfg.ckpt_path)[BUNDLE_KEY]
    stored_net, current_net = dict(bundle.get("net") or {}), model.net_config()
    differences = []
    for key, setting, default in (
        ("hidden_sizes", "model.hidden_sizes", None),
        ("members", "model.members", 1),
        ("dropout", "model.dropout", 0.0),
    ):
        before, now = stored_net.get(key, default), current_net.get(key, default)
        if before != now:
            differences.append(f"{setting} {_shown(before)} (here {_shown(now)})")
    if "activation" in stored_net and stored_net["activation"] != current_net["activation"]:
        differences.append(
            f"activation {activation_name(stored_net['activation'])} "
            f"(here {activation_name(current_net['activation'])})"
        )
    stored_model = dict((bundle.get("config") or {}).get("model") or {})
    weights = OmegaConf.to_container(cfg.model, resolve=True).get("class_weights")
    if stored_model and stored_model.get("class_weights") != weights:
        differences.append(
            f"model.class_weights {_shown(stored_model.get('class_weights'))} "
            f"(here {_shown(weights)})"
        )
    stored_data = dict((bundle.get("config") or {}).get("data") or {})
    current_data = stored_config(cfg)["data"]
    if stored_data and stored_data.get("name") != current_data.get("name"):
        differences.append(f"data={stored_data.get('name')} (here {current_data.get('name')})")
    elif stored_data:
        for key in sorted(set(stored_data) | set(current_data)):
            if key in BATCHING_KEYS or stored_data.get(key) == current_data.get(key):
                continue
            if key == "dataset":
                differences += _dataset_differences(stored_data[key], current_data.get(key))
            else:
                differences.append(
                    f"data.{key} {_shown(stored_data.get(key))} "
                    f"(here {_shown(current_data.get(key))})"
                )
    if differences:
        raise ConfigError(
            f"ckpt_path: {cfg.ckpt_path} was trained with other settings: "
            f"{'; '.join(differences)}; resume with the settings it was trained with"
        )


def _dataset_differences(stored: Any, current: Any) -> list[str]:
    stored, current = dict(stored or {}), dict(current or {})
    return [
        f"data.dataset.{key} {_shown(stored.get(key))} (here {_shown(current.get(key))})"
        for key in sorted(set(stored) | set(current))
        if stored.get(key) != current.get(key)
    ]


def _shown(value: Any) -> str:
    """A setting as one writes it on the command line."""
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(str(item) for item in value) + "]"
    return str(value)


def build_datamodule(data_cfg: DictConfig | dict):
    """Instantiate and set up the data module; data errors surface here, before any writing."""
    datamodule = instantiate(data_cfg, _convert_="all")
    datamodule.setup()
    return datamodule


def build_model(cfg: DictConfig, datamodule):
    factory = instantiate(cfg.model, _partial_=True, _convert_="all")
    factory.keywords.pop("name", None)
    return factory(
        input_size=datamodule.input_size,
        class_names=datamodule.class_names,
        activation=OmegaConf.to_container(cfg.activation, resolve=True),
        name=cfg.model.name,
    )


def _instantiate_group(group: DictConfig | None) -> list[Any]:
    if not group:
        return []
    return [instantiate(item) for item in group.values() if item and "_target_" in item]


class _DropAdverts(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Tip:" not in record.getMessage()


def quiet_lightning() -> None:
    """One copy of each Lightning message on the console, without adverts or noise."""
    logging.getLogger("lightning.pytorch").propagate = False
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropAdverts())
    for message in (
        r".*isinstance\(treespec, LeafSpec\)",
        r".*smaller than the logging interval",
        r".*does not have many workers",
        # The metrics are torchmetrics objects, which synchronise across processes themselves.
        r".*when logging on epoch level in distributed setting",
    ):
        warnings.filterwarnings("ignore", message=message)


def stored_config(cfg: DictConfig) -> dict[str, Any]:
    """The config as plain data, with a data file's path made absolute so that eval.py finds
    the file from any working directory."""
    config = OmegaConf.to_container(cfg, resolve=True)
    dataset = config["data"].get("dataset", {})
    if dataset.get("path"):
        dataset["path"] = str(Path(dataset["path"]).resolve())
    return config


def check_settings(cfg: DictConfig) -> None:
    """Catch impossible settings before anything is written, naming the key."""
    max_epochs = cfg.trainer.get("max_epochs")
    if max_epochs is not None and (not isinstance(max_epochs, int) or max_epochs < -1):
        raise ConfigError(
            f"trainer.max_epochs must be a whole number of epochs (-1: no limit), "
            f"got {max_epochs!r}"
        )


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit the configured model, test its best checkpoint and return every logged metric."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    quiet_lightning()

    run_name = resolve_run_name(cfg)
    os.environ[RUN_NAME_ENV] = run_name
    with open_dict(cfg):
        cfg.run_name = run_name

    check_settings(cfg)
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = build_datamodule(cfg.data)
    model = build_model(cfg, datamodule)
    if cfg.get("ckpt_path"):
        check_resume(cfg, model)
    model.bundle = {
        "format_version": 1,
        "run_name": run_name,
        "dataset": datamodule.name,
        "target": datamodule.describe()["target"],
        "class_names": datamodule.class_names,
        "encoder": datamodule.encoder.state_dict(),
        "data": datamodule.describe(),
        "config": stored_config(cfg),
        "threshold": 0.5,
        "temperature": 1.0,
        "test_metrics": {},
        # Set once calibration and test are done: a run stopped before has False here.
        "finished": False,
    }

    callbacks = _instantiate_group(cfg.get("callbacks"))
    loggers = _instantiate_group(cfg.get("logger"))
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    for logger in loggers:
        logger.log_hyperparams(_flat_hparams(cfg))

    started = time.perf_counter()
    try:
        with warnings.catch_warnings():
            if cfg.get("ckpt_path"):
                # A resumed run continues in its own folder, which is meant to be non-empty.
                warnings.filterwarnings(
                    "ignore", message=r"Checkpoint directory .* exists and is not empty"
                )
            trainer.fit(
                model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"), weights_only=True
            )
    except RuntimeError as error:
        mismatch = ("size mismatch", "Missing key", "Unexpected key")
        if cfg.get("ckpt_path") and any(text in str(error) for text in mismatch):
            raise ConfigError(resume_mismatch(cfg.ckpt_path)) from None
        raise
    fit_seconds = time.perf_counter() - started
    metrics = {key: float(value) for key, value in trainer.callback_metrics.items()}
    metrics["time/fit_seconds"] = fit_seconds

    checkpoint = next(
        (c for c in callbacks if isinstance(c, ModelCheckpoint) and c.monitor is not None), None
    )
    best_path = checkpoint.best_model_path if checkpoint else ""
    if cfg.get("calibration") and best_path:
        calibration = calibrate(
            model, datamodule, best_path, cfg.calibration, write=trainer.is_global_zero
        )
        trainer.strategy.barrier()
        metrics.update(calibration)
        for logger in loggers:
            logger.log_metrics(calibration, step=trainer.global_step)
    finished: dict[str, Any] = {"finished": True}
    if cfg.get("test") and best_path:
        results = trainer.test(
            model, datamodule=datamodule, ckpt_path=best_path, weights_only=True, verbose=False
        )
        finished["test_metrics"] = {key: float(value) for key, value in results[0].items()}
        metrics.update(finished["test_metrics"])
        if trainer.is_global_zero:
            log_reliability_diagram(model, datamodule, loggers, trainer.global_step)

    if trainer.is_global_zero:
        if best_path:
            update_bundle(best_path, **finished)
        for logger in loggers:
            if hasattr(logger, "experiment") and hasattr(logger.experiment, "add_scalar"):
                logger.experiment.add_scalar("time/fit_seconds", fit_seconds, trainer.global_step)
            logger.finalize("success")
        print_summary(run_name, metrics, loggers, best_path, datamodule)
    leave_process_group(trainer)
    return metrics


def leave_process_group(trainer) -> None:
    """Under several processes, wait until all are done, then let the started ones disconnect.

    A started process that exits while still connected can abort in the communication
    library's shutdown; Lightning's launcher then kills the whole run (and, in a sweep, the
    jobs after it). The first process keeps the group: a sweep ends it between jobs.
    """
    distributed = torch.distributed
    if not (distributed.is_available() and distributed.is_initialized()):
        return
    trainer.strategy.barrier()
    if not trainer.is_global_zero:
        distributed.destroy_process_group()


def resume_mismatch(checkpoint_path: str) -> str:
    net = read_checkpoint(checkpoint_path)[BUNDLE_KEY]["net"]
    sizes = ",".join(str(size) for size in net["hidden_sizes"])
    activation = activation_name(net["activation"])
    members = net.get("members", 1)
    return (
        f"ckpt_path: {checkpoint_path} holds a different network than this config; resume "
        f"with the settings it was trained with, e.g. model.hidden_sizes=[{sizes}] "
        f"model.members={members} (activation {activation}) and the same data set"
    )


def _flat_hparams(cfg: DictConfig) -> dict[str, Any]:
    plain = OmegaConf.to_container(cfg, resolve=True)
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), item)
        elif isinstance(value, (list, tuple)):
            flat[prefix] = str(list(value))
        else:
            flat[prefix] = value

    walk("", {k: v for k, v in plain.items() if k not in ("paths",)})
    return flat


def _relative(path: str) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def print_summary(run_name, metrics, loggers, best_path, datamodule) -> None:
    ceiling = datamodule.dataset.bayes_accuracy
    lines = [f"\nRun {run_name} finished."]
    test_keys = sorted(key for key in metrics if key.startswith("test/"))
    if test_keys:
        rows = datamodule.describe()["sizes"].get("test", 0)
        lines.append(f"Test metrics of the best checkpoint ({rows:,} rows):")
        lines += [f"  {key:<24} {metrics[key]:.4f}" for key in test_keys]
        if ceiling is not None:
            lines.append(f"  {'bayes ceiling':<24} {ceiling:.4f}")
    if "calibration/temperature" in metrics:
        lines.append("Fitted on the validation split and stored in the checkpoint:")
        lines.append(f"  {'temperature':<24} {metrics['calibration/temperature']:.4f}")
        if datamodule.task == "binary":
            lines.append(f"  {'threshold':<24} {metrics['calibration/threshold']:.4f}")
    lines.append(f"  {'fit time':<24} {metrics['time/fit_seconds']:.1f} s")
    for logger in loggers:
        if getattr(logger, "log_dir", None):
            lines.append(f"TensorBoard run:   {logger.log_dir}  (tensorboard --logdir logs)")
    if best_path:
        lines.append(f"Best checkpoint:   {_relative(best_path)}")
    print("\n".join(lines), flush=True)
