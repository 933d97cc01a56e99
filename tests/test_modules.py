import pytest
import torch

from purchasenet.errors import ConfigError
from purchasenet.modules import BinaryPurchaseClassifier, SegmentClassifier
from purchasenet.nets import MAX_MEMBERS


def fit_steps(model, inputs, targets, steps=60):
    optimizer = model.configure_optimizers()
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = model.loss(model(inputs), targets)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_binary_classifier_outputs_one_logit_and_its_loss_falls():
    torch.manual_seed(0)
    model = BinaryPurchaseClassifier(input_size=2, class_names=["no", "yes"], hidden_sizes=[8])
    inputs = torch.randn(64, 2)
    targets = (inputs[:, 0] > 0).float()

    assert model(inputs).shape == (64, 1)
    losses = fit_steps(model, inputs, targets)
    assert losses[-1] < 0.5 * losses[0]
    assert model.scores(model(inputs)).min() >= 0 and model.scores(model(inputs)).max() <= 1


def test_segment_classifier_outputs_one_logit_per_class_and_its_loss_falls():
    torch.manual_seed(0)
    model = SegmentClassifier(input_size=2, class_names=list("abcd"), hidden_sizes=[16])
    inputs = torch.randn(128, 2)
    targets = (inputs[:, 0] > 0).long() * 2 + (inputs[:, 1] > 0).long()

    assert model(inputs).shape == (128, 4)
    losses = fit_steps(model, inputs, targets, steps=100)
    assert losses[-1] < 0.5 * losses[0]
    torch.testing.assert_close(model.scores(model(inputs)).sum(-1), torch.ones(128))


def test_model_refuses_a_data_set_with_the_wrong_number_of_classes():
    with pytest.raises(ConfigError, match="model=binary needs a data set with 2 classes"):
        BinaryPurchaseClassifier(input_size=2, class_names=list("abcd"))
    with pytest.raises(ConfigError, match="model=multiclass needs .* 3 or more classes"):
        SegmentClassifier(input_size=2, class_names=["no", "yes"])


def test_class_weights_make_the_rare_class_cost_more():
    model = BinaryPurchaseClassifier(2, ["no", "yes"], class_weights=[1.0, 4.0])
    logits = torch.zeros(2, 1)
    miss_purchase = model.loss(logits[:1], torch.ones(1))
    miss_browse = model.loss(logits[:1], torch.zeros(1))
    assert miss_purchase.item() == pytest.approx(4 * miss_browse.item())


@pytest.mark.parametrize("members", [0, 2.5, "3", MAX_MEMBERS + 1])
def test_model_refuses_a_number_of_members_that_is_not_a_count(members):
    with pytest.raises(ConfigError, match="model.members must be a whole number of networks"):
        BinaryPurchaseClassifier(input_size=2, class_names=["no", "yes"], members=members)


def test_ensemble_classifier_scores_with_the_mean_logit_of_its_members():
    torch.manual_seed(0)
    model = SegmentClassifier(input_size=2, class_names=list("abcd"), hidden_sizes=[8], members=3)
    inputs = torch.randn(5, 2)

    assert model.member_logits(inputs).shape == (3, 5, 4)
    torch.testing.assert_close(model(inputs), model.member_logits(inputs).mean(0))
    assert model.net_config()["members"] == 3
    assert "members" not in SegmentClassifier(2, list("abcd")).net_config()


def test_model_refuses_a_network_too_large_to_build():
    with pytest.raises(ConfigError, match="model: the network would hold .* parameters"):
        BinaryPurchaseClassifier(2, ["no", "yes"], hidden_sizes=[20_000, 20_000], members=2)


def test_gradient_clipping_caps_the_norm_of_every_step():
    import lightning as L

    from conftest import compose_train
    from purchasenet.training import build_datamodule, quiet_lightning

    quiet_lightning()

    class NormRecorder(L.Callback):
        def __init__(self):
            self.norms = []

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
            self.norms.append(torch.linalg.vector_norm(torch.stack(
                [torch.linalg.vector_norm(g) for g in grads])).item())

    norms = {}
    for clip in (None, 0.05):
        torch.manual_seed(0)
        datamodule = build_datamodule(compose_train([]).data)
        datamodule.setup()
        model = BinaryPurchaseClassifier(datamodule.input_size, datamodule.class_names,
                                         gradient_clip_val=clip)
        recorder = NormRecorder()
        trainer = L.Trainer(max_epochs=1, callbacks=[recorder], logger=False,
                            enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, limit_val_batches=0)
        trainer.fit(model, datamodule=datamodule)
        norms[clip] = recorder.norms

    assert len(norms[0.05]) == len(norms[None]) == 25
    assert max(norms[None]) > 0.05
    assert max(norms[0.05]) <= 0.05 * (1 + 1e-4)


@pytest.mark.parametrize("clip", [0, -1.0, True, "big"])
def test_gradient_clip_value_must_be_positive(clip):
    with pytest.raises(ConfigError, match="model.gradient_clip_val must be a positive number"):
        BinaryPurchaseClassifier(2, ["no", "yes"], gradient_clip_val=clip)
