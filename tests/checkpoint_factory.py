"""Fabricate small, valid purchasenet checkpoints without training, for serving tests.

Each checkpoint has the layout training writes (a Lightning checkpoint dict with the
``purchasenet`` bundle), with weights set by hand so the expected answers are known exactly.
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from purchasenet.features import CATEGORICAL, FeatureEncoder, FeatureSpec, FittedFeature
from purchasenet.nets import MLP

RELU = {"_target_": "torch.nn.ReLU"}
BEHAVIOR_CLASSES = ["no_purchase", "window_shopping", "research_purchase", "impulse_purchase"]
MONTHS = ["Aug", "Dec", "Feb", "Jul", "June", "Mar", "May", "Nov", "Oct", "Sep"]
# Name, physical maximum, transform and the largest value of the training rows.
SHOPPERS_NUMERIC = [
    ("Administrative", None, "log1p", 27.0),
    ("Administrative_Duration", None, "log1p", 3398.75),
    ("Informational", None, "log1p", 24.0),
    ("Informational_Duration", None, "log1p", 2549.38),
    ("ProductRelated", None, "log1p", 705.0),
    ("ProductRelated_Duration", None, "log1p", 63973.52),
    ("BounceRates", 1.0, "none", 0.2),
    ("ExitRates", 1.0, "none", 0.2),
    ("PageValues", None, "log1p", 361.76),
    ("SpecialDay", 1.0, "none", 1.0),
]
SHOPPERS_CATEGORICAL = {
    "Month": MONTHS,
    "OperatingSystems": list(range(1, 9)),
    "Browser": list(range(1, 14)),
    "Region": list(range(1, 10)),
    "TrafficType": list(range(1, 21)),
    "VisitorType": ["New_Visitor", "Other", "Returning_Visitor"],
    "Weekend": [False, True],
}


def sigmoid(logit: float) -> float:
    return 1.0 / (1.0 + math.exp(-logit))


def browsing_purchase_probability(minutes: float) -> float:
    """Exact purchase probability of :func:`browsing_checkpoint` for a browsing time."""
    hidden = max(0.0, (minutes - 10.0) / 20.0)
    return sigmoid(4.0 * hidden - 2.0)


def save_checkpoint(
    path: Path,
    *,
    encoder: FeatureEncoder,
    net: MLP,
    net_config: dict[str, Any],
    task: str,
    class_names: Sequence[str],
    dataset: str,
    threshold: float = 0.5,
    run_name: str = "fabricated",
    test_metrics: dict[str, float] | None = None,
) -> Path:
    """Write ``net`` and ``encoder`` as a checkpoint the serving code accepts."""
    path.parent.mkdir(parents=True, exist_ok=True)
    bundle = {
        "format_version": 1,
        "task": task,
        "class_names": list(class_names),
        "target": "Revenue" if task == "binary" else "segment",
        "encoder": encoder.state_dict(),
        "net": net_config,
        "threshold": threshold,
        "temperature": 1.0,
        "run_name": run_name,
        "dataset": dataset,
        "test_metrics": test_metrics or {"test/acc": 0.94, "test/loss": 0.21},
        "config": {"data": {"name": dataset}, "seed": 7},
    }
    checkpoint = {
        "state_dict": {f"net.{key}": value for key, value in net.state_dict().items()},
        "purchasenet": bundle,
        "epoch": 3,
        "global_step": 120,
        "pytorch-lightning_version": "2.6.6",
    }
    torch.save(checkpoint, path)
    return path


def save_browsing_checkpoint(path: Path, net: MLP, net_config: dict, **options: Any) -> Path:
    """A binary model on minutes browsed, with :func:`browsing_encoder`."""
    return save_checkpoint(
        path, encoder=browsing_encoder(), net=net, net_config=net_config, task="binary",
        class_names=["no_purchase", "purchase"], dataset="browsing", **options,
    )


def browsing_encoder() -> FeatureEncoder:
    """Minutes browsed, standardised with mean 30 and standard deviation 20."""
    spec = FeatureSpec("browsing_time", minimum=0.0, description="Minutes spent browsing.")
    return FeatureEncoder(
        [FittedFeature(spec, mean=30.0, std=20.0, observed_min=0.0, observed_max=120.0)]
    )


def browsing_net_config(hidden_units: int) -> dict:
    return {
        "input_size": 1,
        "output_size": 1,
        "hidden_sizes": [hidden_units],
        "activation": RELU,
        "dropout": 0.0,
    }


def browsing_checkpoint(
    path: Path, threshold: float = 0.5, run_name: str = "browsing-demo"
) -> Path:
    """Binary model on ``browsing_time``; the purchase probability rises with minutes browsed.

    One hidden ReLU unit: h = relu((minutes - 10) / 20), logit = 4 h - 2, so the probability is
    0.5 at exactly 20 minutes and the default threshold splits there.
    """
    net_config = browsing_net_config(hidden_units=1)
    net = MLP(**net_config)
    with torch.no_grad():
        hidden, output = net.linear_layers
        hidden.weight.fill_(1.0)
        hidden.bias.fill_(1.0)
        output.weight.fill_(4.0)
        output.bias.fill_(-2.0)
    return save_browsing_checkpoint(path, net, net_config, threshold=threshold, run_name=run_name)


def overflowing_browsing_checkpoint(path: Path) -> Path:
    """A damaged binary model: exact browsing answers up to 100 minutes, NaN from 110.

    Two extra hidden units switch on above 102 minutes with weights so large that their output
    terms overflow float32 to +inf and -inf, whose sum is NaN. Below that they are exactly 0 and
    the model answers like :func:`browsing_checkpoint`.
    """
    net_config = browsing_net_config(hidden_units=3)
    net = MLP(**net_config)
    with torch.no_grad():
        hidden, output = net.linear_layers
        # Standardised minutes x = (minutes - 30) / 20; units: x + 1, then 1e35 (x - 3.6) twice.
        hidden.weight.copy_(torch.tensor([[1.0], [1e35], [1e35]]))
        hidden.bias.copy_(torch.tensor([1.0, -3.6e35, -3.6e35]))
        output.weight.copy_(torch.tensor([[4.0, 1e4, -1e4]]))
        output.bias.fill_(-2.0)
    return save_browsing_checkpoint(path, net, net_config, run_name="overflowing-demo")


def behavior_checkpoint(path: Path) -> Path:
    """Four segments from browsing time and engagement, one per quadrant around the means.

    Short and unengaged: no_purchase; long and unengaged: window_shopping; long and engaged:
    research_purchase; short and engaged: impulse_purchase.
    """
    browsing = FeatureSpec("browsing_time", minimum=0.0, description="Minutes spent browsing.")
    engagement = FeatureSpec(
        "engagement", minimum=0.0, maximum=1.0, description="Share of pages interacted with."
    )
    encoder = FeatureEncoder([
        FittedFeature(browsing, mean=10.0, std=5.0, observed_min=0.0, observed_max=60.0),
        FittedFeature(engagement, mean=0.5, std=0.25, observed_min=0.0, observed_max=1.0),
    ])
    net_config = {
        "input_size": 2,
        "output_size": 4,
        "hidden_sizes": [],
        "activation": RELU,
        "dropout": 0.0,
    }
    net = MLP(**net_config)
    with torch.no_grad():
        (layer,) = net.linear_layers
        layer.weight.copy_(torch.tensor([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]]))
        layer.bias.zero_()
    return save_checkpoint(
        path,
        encoder=encoder,
        net=net,
        net_config=net_config,
        task="multiclass",
        class_names=BEHAVIOR_CLASSES,
        dataset="behavior",
        run_name="behavior-demo",
        test_metrics={"test/acc": 0.81, "test/f1_macro": 0.79},
    )


def shoppers_checkpoint(path: Path, seed: int = 0) -> Path:
    """Binary model over the 17 online-shopper columns, categorical ones one-hot encoded."""
    features = [
        FittedFeature(
            FeatureSpec(name, minimum=0.0, maximum=maximum, transform=transform),
            mean=1.0,
            std=2.0,
            observed_min=0.0,
            observed_max=observed_max,
        )
        for name, maximum, transform, observed_max in SHOPPERS_NUMERIC
    ]
    features += [
        FittedFeature(FeatureSpec(name, kind=CATEGORICAL), categories=list(categories))
        for name, categories in SHOPPERS_CATEGORICAL.items()
    ]
    encoder = FeatureEncoder(features)
    net_config = {
        "input_size": encoder.input_size,
        "output_size": 1,
        "hidden_sizes": [8],
        "activation": RELU,
        "dropout": 0.1,
    }
    torch.manual_seed(seed)
    net = MLP(**net_config)
    return save_checkpoint(
        path,
        encoder=encoder,
        net=net,
        net_config=net_config,
        task="binary",
        class_names=["no_purchase", "purchase"],
        dataset="shoppers",
        run_name="shoppers-demo",
    )


def shoppers_rows() -> dict[str, list]:
    """Three sessions in the column layout of the online-shopper data."""
    return {
        "Administrative": [0, 3, 10],
        "Administrative_Duration": [0.0, 45.5, 320.0],
        "Informational": [0, 1, 4],
        "Informational_Duration": [0.0, 12.0, 180.0],
        "ProductRelated": [1, 25, 140],
        "ProductRelated_Duration": [0.0, 640.0, 5400.0],
        "BounceRates": [0.2, 0.01, 0.0],
        "ExitRates": [0.2, 0.03, 0.01],
        "PageValues": [0.0, 5.5, 42.0],
        "SpecialDay": [0.0, 0.4, 0.0],
        "Month": ["Feb", "Nov", "May"],
        "OperatingSystems": [1, 2, 3],
        "Browser": [1, 2, 5],
        "Region": [1, 3, 9],
        "TrafficType": [1, 2, 13],
        "VisitorType": ["Returning_Visitor", "New_Visitor", "Returning_Visitor"],
        "Weekend": [False, True, False],
    }


def corrupt_checkpoint(path: Path) -> Path:
    """A file named like a checkpoint whose bytes are not one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"PK\x03\x04 truncated, not a checkpoint")
    return path


def foreign_checkpoint(path: Path) -> Path:
    """A readable PyTorch checkpoint that some other project wrote (no purchasenet bundle)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {"layer.weight": torch.zeros(2, 2)}, "epoch": 1}, path)
    return path


def incomplete_checkpoint(path: Path) -> Path:
    """A checkpoint with our section name but without the network, encoder or classes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"purchasenet": {"task": "binary"}, "state_dict": {}}, path)
    return path


class CreatesFile:
    """Unpickling this object opens, and so creates, ``path``: code no checkpoint may run."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def code_running_checkpoint(path: Path, marker: Path) -> Path:
    """A torch checkpoint whose bundle creates ``marker`` when unpickled without weights_only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"purchasenet": CreatesFile(marker), "state_dict": {}}, path)
    return path


def code_running_pickle(path: Path, marker: Path) -> Path:
    """The same trap as a plain pickle file rather than torch's zip format."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as file:
        pickle.dump({"purchasenet": CreatesFile(marker)}, file, protocol=4)
    return path
