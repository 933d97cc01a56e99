import numpy as np
import pandas as pd
import pytest
from sklearn.model_selection import train_test_split

from purchasenet.datasets import (
    TARGET,
    BehaviourSegments,
    BrowsingMinutes,
    CsvDataset,
    NoisyXor,
    OnlineShoppers,
    SweetSpots,
    shipped_shoppers_csv,
)
from purchasenet.errors import DataError
from purchasenet.features import FeatureEncoder


def bayes_rule_accuracy(dataset, frame: pd.DataFrame) -> float:
    """Accuracy of the known optimal rule for each synthetic problem."""
    minutes = frame["browsing_time"].to_numpy()
    if isinstance(dataset, BrowsingMinutes):
        guess = minutes > 20.0
    elif isinstance(dataset, SweetSpots):
        guess = np.zeros(len(frame), dtype=bool)
        for low, high in dataset.windows:
            guess |= (minutes >= low) & (minutes <= high)
    elif isinstance(dataset, NoisyXor):
        guess = (minutes > 0.5) ^ (frame["engagement"].to_numpy() > 0.5)
    else:
        high_time = minutes > 0.55
        high_engagement = frame["engagement"].to_numpy() > 0.55
        guess = np.select(
            [~high_time & ~high_engagement, high_time & ~high_engagement, high_time],
            [0, 1, 2],
            default=3,
        )
    return float((guess.astype(np.int64) == frame[TARGET].to_numpy()).mean())


@pytest.mark.parametrize(
    "dataset_class, ceiling",
    [(BrowsingMinutes, 0.941), (SweetSpots, 0.667), (NoisyXor, 0.909), (BehaviourSegments, 0.8)],
)
def test_stated_ceiling_is_what_the_optimal_rule_reaches(dataset_class, ceiling):
    dataset = dataset_class(n_train=10, n_val=10, n_test=200_000, seed=3)
    assert dataset.bayes_accuracy == pytest.approx(ceiling, abs=0.001)
    assert bayes_rule_accuracy(dataset, dataset.load().test) == pytest.approx(ceiling, abs=0.004)


@pytest.mark.parametrize(
    "dataset_class", [BrowsingMinutes, SweetSpots, NoisyXor, BehaviourSegments]
)
def test_synthetic_splits_have_requested_sizes_and_repeat_with_the_seed(dataset_class):
    first = dataset_class(n_train=50, n_val=20, n_test=30, seed=7).load()
    again = dataset_class(n_train=50, n_val=20, n_test=30, seed=7).load()
    other = dataset_class(n_train=50, n_val=20, n_test=30, seed=8).load()

    assert first.sizes() == {"train": 50, "val": 20, "test": 30}
    pd.testing.assert_frame_equal(first.train, again.train)
    assert not first.train.equals(other.train)
    assert set(first.train.columns) == {f.name for f in dataset_class.features} | {TARGET}


def test_test_split_does_not_change_with_training_size():
    small = BrowsingMinutes(n_train=100, n_test=500).load().test
    large = BrowsingMinutes(n_train=5000, n_test=500).load().test
    pd.testing.assert_frame_equal(small, large)


def test_browsing_minutes_are_clipped_and_labels_follow_minutes():
    frame = BrowsingMinutes(n_train=20_000).load().train
    assert frame["browsing_time"].between(0.5, 120.0).all()
    assert frame["browsing_time"].mean() == pytest.approx(10.0, rel=0.05)
    long_visits = frame[frame["browsing_time"] > 30][TARGET].mean()
    short_visits = frame[frame["browsing_time"] < 10][TARGET].mean()
    assert long_visits > 0.95 and short_visits < 0.05


def test_behaviour_segments_have_four_balanced_classes():
    frame = BehaviourSegments(n_train=8000).load().train
    shares = np.bincount(frame[TARGET], minlength=4) / len(frame)
    assert np.allclose(shares, 0.25, atol=0.03)


def test_shoppers_split_matches_the_published_split_exactly():
    dataset = OnlineShoppers()
    splits = dataset.load()
    raw = pd.read_csv(shipped_shoppers_csv())
    rest, test = train_test_split(raw, test_size=0.2, stratify=raw["Revenue"], random_state=42)

    assert len(splits.train) + len(splits.val) == 9864
    assert len(splits.test) == 2466
    np.testing.assert_array_equal(splits.test[TARGET].to_numpy(), test["Revenue"].astype(int))
    np.testing.assert_allclose(splits.test["PageValues"], test["PageValues"])
    assert dataset.task == "binary" and len(dataset.features) == 17
    assert splits.val[TARGET].mean() == pytest.approx(rest["Revenue"].mean(), abs=0.01)


def test_encoder_statistics_come_from_training_rows_only():
    splits = OnlineShoppers().load()
    dataset = OnlineShoppers()
    encoder = FeatureEncoder.fit(dataset.features, splits.train)
    by_name = {f.spec.name: f for f in encoder.features}

    assert by_name["PageValues"].mean == pytest.approx(splits.train["PageValues"].mean())
    assert by_name["PageValues"].mean != pytest.approx(splits.test["PageValues"].mean())
    assert by_name["Month"].categories == sorted(splits.train["Month"].unique())
    encoded = encoder.transform(splits.train)
    assert encoded.shape == (len(splits.train), encoder.input_size)
    assert np.allclose(encoded[:, 0].mean(), 0.0, atol=1e-5)


def write_csv(path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_csv_dataset_encodes_any_target_with_named_classes(tmp_path):
    rows = "\n".join(f"{m},{'yes' if m > 5 else 'no'},{'phone' if m % 2 else 'desktop'}"
                     for m in range(40))
    path = write_csv(tmp_path / "visits.csv", "minutes,bought,device\n" + rows + "\n")
    dataset = CsvDataset(path, target="bought", numeric=["minutes"], categorical=["device"])
    splits = dataset.load()

    assert dataset.class_names == ["no", "yes"]
    assert sum(splits.sizes().values()) == 40
    assert splits.train[TARGET].isin([0, 1]).all()


@pytest.mark.parametrize(
    "content, options, message",
    [
        ("a,b\n1,2\n", {"target": "y", "numeric": ["a"]}, "missing column(s) ['y']"),
        ("a,y\n1,0\n2,1\n", {"target": "y", "numeric": ["a", "c"]}, "missing column(s) ['c']"),
        ("a,y\n1,0\nx,1\n3,0\n", {"target": "y", "numeric": ["a"]},
         "column 'a' must be numeric; data row 2 (line 3) holds 'x'"),
        ("a,y\n1,0\n,1\n", {"target": "y", "numeric": ["a"]},
         "column 'a' has 1 empty value(s), first at data row 2 (line 3)"),
        ("a,y\n1,1\n2,1\n", {"target": "y", "numeric": ["a"]}, "holds a single class"),
        ("a,y\n", {"target": "y", "numeric": ["a"]}, "has a header but no rows"),
        ("", {"target": "y", "numeric": ["a"]}, "the file is empty"),
        ("a,y\n1,0\n-2,1\n", {"target": "y", "numeric": ["a"], "bounds": {"a": [0, None]}},
         "column 'a' must be at least 0 (data.dataset.bounds); data row 2 (line 3) holds -2"),
        ("a,y\n1,0\n120,1\n", {"target": "y", "numeric": ["a"], "bounds": {"a": [None, 100]}},
         "column 'a' must be at most 100 (data.dataset.bounds); data row 2 (line 3) holds 120"),
    ],
)
def test_bad_csv_is_reported_with_the_column_and_row(tmp_path, content, options, message):
    dataset = CsvDataset(write_csv(tmp_path / "bad.csv", content), **options)
    with pytest.raises(DataError) as error:
        dataset.load()
    assert message in str(error.value)


def test_missing_csv_file_names_the_path(tmp_path):
    with pytest.raises(DataError, match="no such CSV file: .*absent.csv"):
        CsvDataset(str(tmp_path / "absent.csv"), target="y", numeric=["a"]).load()
