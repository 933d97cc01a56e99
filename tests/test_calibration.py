"""Temperature and threshold: fitted on validation, stored in the checkpoint, used to predict."""

import math

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from purchasenet.calibration import (
    best_f1,
    choose_threshold,
    fit_temperature,
    reliability_bins,
)
from purchasenet.datasets import OnlineShoppers
from purchasenet.errors import ConfigError
from purchasenet.inference import BUNDLE_KEY, PurchaseModel
from purchasenet.modules import BinaryPurchaseClassifier
from purchasenet.quality import score_predictions
from purchasenet.training import train


def test_fitted_temperature_undoes_overconfident_logits():
    generator = torch.Generator().manual_seed(0)
    honest_logits = 2.0 * torch.randn(20_000, generator=generator)
    purchases = torch.bernoulli(torch.sigmoid(honest_logits), generator=generator)

    temperature = fit_temperature(3.0 * honest_logits, purchases, "binary")

    assert temperature == pytest.approx(3.0, rel=0.05)


def test_fitted_temperature_for_segments_undoes_underconfident_logits():
    generator = torch.Generator().manual_seed(1)
    honest_logits = 2.0 * torch.randn(20_000, 4, generator=generator)
    segments = torch.multinomial(torch.softmax(honest_logits, dim=-1), 1, generator=generator)

    temperature = fit_temperature(0.5 * honest_logits, segments.squeeze(-1), "multiclass")

    assert temperature == pytest.approx(0.5, rel=0.05)


def test_f1_threshold_is_half_the_best_f1_on_the_rows():
    probabilities = np.array([0.9, 0.8, 0.3, 0.2])
    purchases = np.array([1, 0, 1, 0])

    # Predicting the top three as purchases catches both: F1 = 2·2 / (3 + 2) = 0.8.
    assert best_f1(probabilities, purchases) == pytest.approx(0.8)
    assert choose_threshold(probabilities, purchases, "f1") == pytest.approx(0.4)
    assert choose_threshold(probabilities, purchases, "accuracy") == 0.5
    assert choose_threshold(probabilities, np.array([1, 0, 0, 0]), "balanced_accuracy") == 0.25


def test_unknown_threshold_objective_names_the_key_and_the_choices():
    with pytest.raises(ConfigError, match="calibration.threshold_objective must be one of f1"):
        choose_threshold(np.array([0.5]), np.array([1]), "recall")


def test_expected_calibration_error_on_a_known_example():
    # Two rows at 0.1 of which one buys (gap 0.4), two at 0.9 that both buy (gap 0.1):
    # ECE = 2/4 · 0.4 + 2/4 · 0.1.
    probabilities = np.array([0.1, 0.1, 0.9, 0.9])
    purchases = np.array([0, 1, 1, 1])

    scores = score_predictions(probabilities, purchases, threshold=0.5)
    bins = reliability_bins(probabilities, purchases)

    assert scores["ece"] == pytest.approx(0.25)
    assert scores["f1"] == pytest.approx(0.8) and scores["acc"] == pytest.approx(0.75)
    assert bins["count"].sum() == 4 and bins["count"][1] == 2 and bins["count"][13] == 2
    assert bins["frequency"][1] == pytest.approx(0.5) and bins["confidence"][13] == 0.9


def test_classifier_scores_with_its_temperature_and_decides_at_its_threshold():
    model = BinaryPurchaseClassifier(input_size=1, class_names=["no", "yes"])
    model.use_calibration(temperature=2.0, threshold=0.3)
    logits = torch.tensor([[math.log(3.0)], [-1.0]])

    probabilities = model.scores(logits)
    model.test_metrics.update(probabilities, torch.tensor([1.0, 0.0]))
    values = model.test_metrics.compute()

    # sigmoid(ln 3 / 2) = 0.634 and sigmoid(-0.5) = 0.378: both buy at 0.3, neither at 0.5.
    torch.testing.assert_close(probabilities, torch.sigmoid(logits.squeeze(-1) / 2.0))
    assert values["test/acc"].item() == pytest.approx(0.5)
    assert values["test/f1"].item() == pytest.approx(2 / 3)
    assert model.bundle == {"temperature": 2.0, "threshold": 0.3}


@pytest.fixture(scope="module")
def calibrated_shoppers(tmp_path_factory):
    from conftest import compose_train

    workdir = tmp_path_factory.mktemp("calibrated")
    cfg = compose_train(["data=shoppers", "trainer.max_epochs=2"], workdir)
    return workdir, train(cfg)


def test_threshold_and_temperature_are_stored_and_used_by_the_served_model(calibrated_shoppers):
    workdir, metrics = calibrated_shoppers
    (run,) = (workdir / "checkpoints").iterdir()
    bundle = torch.load(run / "best.ckpt", weights_only=True)[BUNDLE_KEY]

    served = PurchaseModel.from_checkpoint(run / "best.ckpt")
    inputs = torch.randn(5, served.encoder.input_size)
    with torch.no_grad():
        logits = served.net(inputs).squeeze(-1)

    assert bundle["threshold"] == pytest.approx(metrics["calibration/threshold"])
    assert bundle["temperature"] == pytest.approx(metrics["calibration/temperature"])
    assert 0.05 < bundle["threshold"] < 0.5 and bundle["temperature"] != 1.0
    assert (served.threshold, served.temperature) == (bundle["threshold"], bundle["temperature"])
    probabilities = served.probabilities_from_inputs(inputs)
    np.testing.assert_allclose(
        probabilities, torch.sigmoid(logits / bundle["temperature"]).numpy(), rtol=1e-5
    )
    assert served.decide(np.array([bundle["threshold"] - 1e-6, bundle["threshold"]])).tolist() == [
        0.0,
        1.0,
    ]


def test_calibrated_run_logs_test_quality_tags_and_a_reliability_diagram(calibrated_shoppers):
    workdir, metrics = calibrated_shoppers
    (log_dir,) = (workdir / "logs").iterdir()
    events = EventAccumulator(str(log_dir), size_guidance={"images": 0})
    events.Reload()

    wanted = {"test/auroc", "test/average_precision", "test/f1", "test/ece"}
    assert wanted | {"calibration/threshold", "calibration/temperature"} <= set(
        events.Tags()["scalars"]
    )
    assert events.Tags()["images"] == ["figures/reliability_diagram/test"]
    assert 0.0 <= metrics["test/ece"] < 0.1


def test_server_decides_at_the_stored_threshold_not_at_one_half(calibrated_shoppers):
    from purchasenet.serving import api_for_model

    workdir, _ = calibrated_shoppers
    (run,) = (workdir / "checkpoints").iterdir()
    model = PurchaseModel.from_checkpoint(run / "best.ckpt")
    api = api_for_model(model, run / "best.ckpt")
    api.setup("cpu")
    sessions = OnlineShoppers().load().test
    probabilities = model.predict_proba(sessions)
    unsure = sessions[(probabilities >= model.threshold) & (probabilities < 0.5)].head(3)

    request = {name: unsure[name].tolist() for name in model.feature_names}
    answer = api.encode_response(api.predict(api.decode_request(request)))

    assert len(unsure) > 0
    assert answer["predictions"] == [1.0] * len(unsure)
    assert answer["probabilities"] == pytest.approx(model.predict_proba(unsure).tolist())
