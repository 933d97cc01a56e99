"""Batch prediction from a CSV: rows checked as the server checks them, output written whole."""

import warnings

import pandas as pd
import pytest

from checkpoint_factory import browsing_checkpoint, shoppers_checkpoint, shoppers_rows
from purchasenet.errors import DataError
from purchasenet.predictions import predict_file


@pytest.fixture
def browsing(tmp_path):
    return browsing_checkpoint(tmp_path / "browsing.ckpt")


def test_scored_file_keeps_every_row_and_column(browsing, tmp_path):
    source = tmp_path / "visits.csv"
    pd.DataFrame({"visit": ["a", "b"], "browsing_time": [5.0, 60.0]}).to_csv(source, index=False)

    assert predict_file(browsing, source, tmp_path / "out" / "scored.csv") == 2

    scored = pd.read_csv(tmp_path / "out" / "scored.csv")
    assert scored["visit"].tolist() == ["a", "b"]
    assert scored["prediction"].tolist() == ["no_purchase", "purchase"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["scored.csv"]


@pytest.mark.parametrize(
    ("minutes", "message"),
    [
        ("-3.0", r"column 'browsing_time' must be at least 0; data row 2 \(line 3\) holds -3.0"),
        ("inf", r"'browsing_time' must hold finite numbers; data row 2 \(line 3\) holds inf"),
    ],
)
def test_values_the_server_refuses_stop_batch_prediction_too(browsing, tmp_path, minutes, message):
    source = tmp_path / "visits.csv"
    source.write_text(f"browsing_time\n5.0\n{minutes}\n")
    target = tmp_path / "scored.csv"

    with pytest.raises(DataError, match=message):
        predict_file(browsing, source, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["browsing.ckpt", "visits.csv"]


def test_the_input_file_is_never_overwritten(browsing, tmp_path):
    source = tmp_path / "visits.csv"
    source.write_text("browsing_time\n5.0\n")

    with pytest.raises(DataError, match="is the input file; write the scored rows to another"):
        predict_file(browsing, source, tmp_path / "." / "visits.csv")
    assert source.read_text() == "browsing_time\n5.0\n"


def test_an_existing_output_stays_whole_when_scoring_fails(browsing, tmp_path):
    target = tmp_path / "scored.csv"
    target.write_text("earlier results\n")
    source = tmp_path / "visits.csv"
    source.write_text("browsing_time\n-1\n")

    with pytest.raises(DataError):
        predict_file(browsing, source, target)
    assert target.read_text() == "earlier results\n"


def test_unseen_categories_are_scored_with_a_warning_naming_the_column(tmp_path):
    checkpoint = shoppers_checkpoint(tmp_path / "shoppers.ckpt")
    rows = shoppers_rows()
    rows["VisitorType"] = ["Returning_Visitor", "Robot", "Returning_Visitor"]
    source = tmp_path / "sessions.csv"
    pd.DataFrame(rows).to_csv(source, index=False)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert predict_file(checkpoint, source, tmp_path / "scored.csv") == 3

    messages = [str(w.message) for w in caught]
    assert messages == [
        "sessions.csv: column 'VisitorType' holds values training never saw ('Robot'); "
        "they are scored as no known category"
    ]


def test_an_output_that_is_a_folder_or_unwritable_ends_in_one_message(browsing, tmp_path):
    source = tmp_path / "visits.csv"
    source.write_text("browsing_time\n5.0\n")
    (tmp_path / "blocked").write_text("a file where a folder should be\n")

    with pytest.raises(DataError, match=r"output .* is a folder; name a file, e.g. .*scored.csv"):
        predict_file(browsing, source, tmp_path)
    with pytest.raises(DataError, match=r"cannot write output .*blocked/scored.csv"):
        predict_file(browsing, source, tmp_path / "blocked" / "scored.csv")


def test_the_checkpoint_is_never_overwritten(browsing, tmp_path):
    source = tmp_path / "visits.csv"
    source.write_text("browsing_time\n5.0\n")
    before = browsing.read_bytes()

    with pytest.raises(DataError, match="is the checkpoint; write the scored rows to another"):
        predict_file(browsing, source, browsing)
    assert browsing.read_bytes() == before


def test_a_value_too_large_for_float32_still_gets_a_probability(browsing, tmp_path):
    source = tmp_path / "visits.csv"
    source.write_text("browsing_time\n5.0\n1e300\n")

    predict_file(browsing, source, tmp_path / "scored.csv")

    scored = pd.read_csv(tmp_path / "scored.csv")
    assert scored["probability_purchase"].notna().all()
    assert scored["prediction"].tolist() == ["no_purchase", "purchase"]


def test_a_row_scores_the_same_whatever_its_neighbours_make_of_the_column_type(tmp_path):
    checkpoint = shoppers_checkpoint(tmp_path / "shoppers.ckpt")
    rows = pd.DataFrame(shoppers_rows())
    rows.to_csv(tmp_path / "booleans.csv", index=False)
    # One row of text turns the whole Weekend column into text.
    odd = rows.iloc[[0]].assign(Weekend="sometimes")
    pd.concat([rows, odd]).to_csv(tmp_path / "text.csv", index=False)

    predict_file(checkpoint, tmp_path / "booleans.csv", tmp_path / "a.csv")
    unseen = r"'Weekend' holds values training never saw \('sometimes'\)"
    with pytest.warns(UserWarning, match=unseen):
        predict_file(checkpoint, tmp_path / "text.csv", tmp_path / "b.csv")

    first = pd.read_csv(tmp_path / "a.csv")["probability_purchase"]
    second = pd.read_csv(tmp_path / "b.csv")["probability_purchase"]
    assert second[:3].tolist() == pytest.approx(first.tolist(), rel=1e-6)
