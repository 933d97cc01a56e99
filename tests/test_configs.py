"""Every option of every config group composes and builds real objects."""

from pathlib import Path

import pytest
from hydra.utils import instantiate

from conftest import CONF, compose_train
from purchasenet.training import build_datamodule, build_model

OPTIONS = {group: sorted(p.stem for p in (CONF / group).glob("*.yaml"))
           for group in ("data", "model", "activation", "trainer")}
COMPATIBLE_MODEL = {"behavior": "multiclass"}


def test_default_config_is_browsing_binary_relu():
    cfg = compose_train([])
    assert (cfg.data.name, cfg.model.name, cfg.activation._target_) == (
        "browsing", "binary", "torch.nn.ReLU"
    )


def test_multiclass_switches_the_data_default_but_an_explicit_choice_wins():
    assert compose_train(["model=multiclass"]).data.name == "behavior"
    assert compose_train(["model=multiclass", "data=xor"]).data.name == "xor"
    assert compose_train(["data=xor", "model=multiclass"]).data.name == "xor"


@pytest.mark.parametrize("activation", OPTIONS["activation"])
def test_each_activation_is_a_torch_nn_module(activation):
    import torch

    module = instantiate(compose_train([f"activation={activation}"]).activation)
    assert isinstance(module, torch.nn.Module)


@pytest.mark.parametrize("data", [d for d in OPTIONS["data"] if d != "csv"])
def test_each_data_set_builds_a_model_of_its_task(data):
    model_name = COMPATIBLE_MODEL.get(data, "binary")
    cfg = compose_train([f"data={data}", f"model={model_name}", "data.dataset.n_test=50"]
                        if data != "shoppers" else [f"data={data}"])
    datamodule = build_datamodule(cfg.data)
    model = build_model(cfg, datamodule)
    first_chunk = next(iter(datamodule.train_dataloader()))
    inputs, targets = first_chunk[0]

    assert model.task == datamodule.task
    assert inputs.shape == (cfg.data.batch_size, datamodule.input_size)
    assert model(inputs).shape[0] == len(targets)


def test_csv_option_builds_from_a_described_file(tmp_path: Path):
    path = tmp_path / "visits.csv"
    path.write_text("minutes,device,bought\n" + "".join(
        f"{m},{'phone' if m % 3 else 'desktop'},{int(m > 20)}\n" for m in range(60)))
    cfg = compose_train(["data=csv", f"data.dataset.path={path}", "data.dataset.target=bought",
                         "data.dataset.numeric=[minutes]", "data.dataset.categorical=[device]"])
    datamodule = build_datamodule(cfg.data)
    assert datamodule.input_size == 3 and datamodule.class_names == ["0", "1"]


@pytest.mark.parametrize("trainer", OPTIONS["trainer"])
def test_trainer_options_compose(trainer):
    cfg = compose_train([f"trainer={trainer}"])
    assert cfg.trainer._target_ == "lightning.Trainer"
