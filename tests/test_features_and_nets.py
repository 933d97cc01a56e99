import io

import numpy as np
import pytest
import torch

from purchasenet.features import CATEGORICAL, NUMERIC, FeatureEncoder, FeatureSpec
from purchasenet.nets import MAX_MEMBERS, MLP, MLPEnsemble, build_activation, build_net

RELU = {"_target_": "torch.nn.ReLU"}

SPECS = [
    FeatureSpec("minutes", NUMERIC, minimum=0.0),
    FeatureSpec("pages", NUMERIC, minimum=0.0, transform="log1p"),
    FeatureSpec("device", CATEGORICAL),
    FeatureSpec("region", CATEGORICAL),
]
COLUMNS = {
    "minutes": [1.0, 3.0, 5.0, 7.0],
    "pages": [0, 9, 99, 999],
    "device": ["phone", "desktop", "phone", "tablet"],
    "region": [3, 1, 2, 1],
}


def test_encoder_standardises_numbers_and_one_hot_encodes_categories():
    encoder = FeatureEncoder.fit(SPECS, COLUMNS)
    encoded = encoder.transform(COLUMNS)

    assert encoder.input_size == 1 + 1 + 3 + 3
    assert encoded.dtype == np.float32 and encoded.shape == (4, 8)
    np.testing.assert_allclose(encoded[:, 0], [-1.3416, -0.4472, 0.4472, 1.3416], atol=1e-4)
    np.testing.assert_allclose(encoded[:, 1].mean(), 0.0, atol=1e-6)
    np.testing.assert_array_equal(encoded[:, 2:5], [[0, 1, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]])
    assert encoder.features[3].categories == [1, 2, 3]


def test_unseen_category_encodes_as_no_known_category():
    encoder = FeatureEncoder.fit(SPECS, COLUMNS)
    row = {"minutes": [2.0], "pages": [5], "device": ["smart-tv"], "region": [2]}
    encoded = encoder.transform(row)
    np.testing.assert_array_equal(encoded[0, 2:5], [0, 0, 0])
    np.testing.assert_array_equal(encoded[0, 5:8], [0, 1, 0])


def test_encoder_state_survives_a_weights_only_round_trip():
    encoder = FeatureEncoder.fit(SPECS, COLUMNS)
    buffer = io.BytesIO()
    torch.save({"encoder": encoder.state_dict()}, buffer)
    buffer.seek(0)
    restored = FeatureEncoder.from_state_dict(torch.load(buffer, weights_only=True)["encoder"])
    np.testing.assert_array_equal(restored.transform(COLUMNS), encoder.transform(COLUMNS))


def test_unscaled_encoder_passes_numbers_through():
    encoder = FeatureEncoder.fit(SPECS[:1], COLUMNS, scale=False)
    np.testing.assert_array_equal(encoder.transform(COLUMNS)[:, 0], COLUMNS["minutes"])


@pytest.mark.parametrize(
    "spec, message",
    [
        (dict(name="x", kind="text"), "kind must be"),
        (dict(name="x", transform="sqrt"), "transform must be one of"),
        (dict(name="x", transform="log1p"), "log1p needs a minimum"),
    ],
)
def test_invalid_feature_specs_name_the_feature(spec, message):
    with pytest.raises(ValueError, match=message):
        FeatureSpec(**spec)


def test_mlp_has_the_requested_layers_and_output():
    net = MLP(3, 4, hidden_sizes=[8, 5], activation={"_target_": "torch.nn.Tanh"}, dropout=0.1)
    assert [layer.out_features for layer in net.linear_layers] == [8, 5, 4]
    assert sum(isinstance(m, torch.nn.Tanh) for m in net) == 2
    assert net(torch.zeros(6, 3)).shape == (6, 4)


def test_activation_accepts_arguments_and_refuses_anything_outside_torch_nn():
    leaky = build_activation({"_target_": "torch.nn.LeakyReLU", "negative_slope": 0.2})
    assert leaky.negative_slope == 0.2
    with pytest.raises(ValueError, match="activation._target_ must be one of"):
        build_activation({"_target_": "os.system"})


def standalone_member(ensemble: MLPEnsemble, member: int) -> MLP:
    """An MLP holding the weights of one ensemble member."""
    net = MLP(3, 1, hidden_sizes=[8, 4], activation=RELU)
    with torch.no_grad():
        for layer, batched in zip(net.linear_layers, ensemble.linear_layers):
            layer.weight.copy_(batched.weight[member].T)
            layer.bias.copy_(batched.bias[member])
    return net


def test_ensemble_members_are_separate_mlps_and_the_output_is_their_mean_logit():
    torch.manual_seed(0)
    ensemble = MLPEnsemble(3, 1, hidden_sizes=[8, 4], activation=RELU, members=3)
    inputs = torch.randn(10, 3)
    members = [standalone_member(ensemble, k) for k in range(3)]

    member_logits = ensemble.member_logits(inputs)
    assert member_logits.shape == (3, 10, 1)
    for k, net in enumerate(members):
        torch.testing.assert_close(member_logits[k], net(inputs))
    torch.testing.assert_close(ensemble(inputs), torch.stack([n(inputs) for n in members]).mean(0))
    # Different starting weights for every member.
    first = ensemble.linear_layers[0].weight
    assert not torch.equal(first[0], first[1]) and not torch.equal(first[1], first[2])


def test_each_ensemble_member_gets_the_gradient_of_its_own_loss():
    torch.manual_seed(1)
    ensemble = MLPEnsemble(3, 1, hidden_sizes=[8, 4], activation=RELU, members=3)
    inputs, targets = torch.randn(16, 3), torch.randint(0, 2, (16,)).float()
    member_logits = ensemble.member_logits(inputs).flatten(0, 1).squeeze(-1)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(member_logits, targets.repeat(3))
    (loss * 3).backward()

    alone = standalone_member(ensemble, 2)
    own = torch.nn.functional.binary_cross_entropy_with_logits(alone(inputs).squeeze(-1), targets)
    own.backward()
    for layer, batched in zip(alone.linear_layers, ensemble.linear_layers):
        torch.testing.assert_close(batched.weight.grad[2], layer.weight.grad.T)
        torch.testing.assert_close(batched.bias.grad[2], layer.bias.grad)


def test_build_net_reads_the_number_of_members():
    config = dict(input_size=3, output_size=2, hidden_sizes=[4], activation=RELU)
    assert type(build_net(config)) is MLP
    assert type(build_net({**config, "members": 1})) is MLP
    assert build_net({**config, "members": 4}).members == 4
    for members in (0, MAX_MEMBERS + 1):
        with pytest.raises(ValueError, match=f"members must be between 1 and {MAX_MEMBERS}"):
            build_net({**config, "members": members})


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"hidden_sizes": [100_000, 100_000]}, "parameters, more than 50,000,000"),
        ({"members": 64, "hidden_sizes": [1000, 1000]}, "parameters, more than 50,000,000"),
        ({"hidden_sizes": [0]}, "layer widths must be positive whole numbers"),
        ({"hidden_sizes": [-4]}, "layer widths must be positive whole numbers"),
    ],
)
def test_build_net_refuses_a_described_network_before_allocating_it(change, message):
    config = dict(input_size=3, output_size=2, hidden_sizes=[4], activation=RELU)
    with pytest.raises(ValueError, match=message):
        build_net({**config, **change})
