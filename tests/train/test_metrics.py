"""Run metrics: the MFU denominator's device lookup and the summed-metric means."""
import pytest

from train import metrics


@pytest.mark.parametrize("device_kind, expected", [
    ("NVIDIA H100 PCIe", 756e12),  # listed after the shorter "NVIDIA H100": exact match wins
    ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H100 80GB HBM3", 989e12),
    ("NVIDIA H100", 989e12),
    ("NVIDIA H200", 989e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5p chip", 459e12),  # no exact key: the longest prefix
])
def test_peak_lookup_matches_exactly_then_by_longest_prefix(device_kind, expected):
    assert metrics.PEAK_FLOPS[metrics.peak_kind(device_kind)] == expected


def test_unknown_device_has_no_peak():
    assert metrics.peak_kind("Some Accelerator 9000") is None


def test_summarize_divides_sums_by_the_token_count():
    out = metrics.summarize({"loss_sum": 6.0, "weight_sum": 3.0, "correct_sum": 1.5,
                             "grad_norm": 0.25})
    assert out["loss"] == 2.0 and out["accuracy"] == 0.5 and out["grad_norm"] == 0.25
