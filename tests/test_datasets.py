"""The shipped dataset and the script that made it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from fusebus.datasets import SensorDataset, load_dataset
from schemas import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def test_basicmotions_has_the_documented_shape(basicmotions: SensorDataset) -> None:
    """40 train and 40 test cases of 100 samples x 6 channels, 10 per activity, at 10 Hz."""
    assert basicmotions.x_train.shape == (40, 100, 6) and basicmotions.x_test.shape == (40, 100, 6)
    assert basicmotions.labels == ("badminton", "running", "standing", "walking")
    assert np.bincount(basicmotions.y_train).tolist() == [10, 10, 10, 10]
    assert np.bincount(basicmotions.y_test).tolist() == [10, 10, 10, 10]
    assert basicmotions.period_ns == 100_000_000
    accel = basicmotions.sensor_view(basicmotions.x_test[0], "accel")
    np.testing.assert_array_equal(accel, basicmotions.x_test[0][:, :3])


def test_unknown_dataset_is_a_config_error() -> None:
    """Asking for a dataset that is not shipped names the known ones."""
    with pytest.raises(ConfigError, match="known: basicmotions"):
        load_dataset("mnist")


def test_ts_parser_reads_multivariate_cases() -> None:
    """The conversion script parses the UEA .ts layout: dims split by ':', class label last."""
    spec = importlib.util.spec_from_file_location("make_bm", ROOT / "data" / "make_basicmotions.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    text = "#comment\n@problemName X\n@data\n1,2,3:4,5,6:Walking\n7,8,9:1,1,1:Running\n"
    x, labels = module.parse_ts(text)
    assert x.shape == (2, 3, 2) and labels == ["walking", "running"]
    assert x[0, :, 1].tolist() == [4, 5, 6]
