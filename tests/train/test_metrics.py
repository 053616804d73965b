"""Run metrics: the MFU denominator's device lookup, the summed-metric means and the
TensorBoard event files."""
import json
import struct

import pytest

from train import events, metrics


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


def _read_events(path):
    """Every Event in a TensorBoard file, each record's CRCs checked with tensorboardX's."""
    from tensorboardX.proto import event_pb2
    from tensorboardX.record_writer import masked_crc32c
    data, out, at = path.read_bytes(), [], 0
    while at < len(data):
        header = data[at:at + 8]
        (length,), (header_crc,) = struct.unpack("<Q", header), struct.unpack(
            "<I", data[at + 8:at + 12])
        body = data[at + 12:at + 12 + length]
        (body_crc,) = struct.unpack("<I", data[at + 12 + length:at + 16 + length])
        assert header_crc == masked_crc32c(header) and body_crc == masked_crc32c(body)
        out.append(event_pb2.Event.FromString(body))
        at += 16 + length
    return out


def test_crc32c_check_value():
    assert events.crc32c(b"123456789") == 0xE3069283  # the CRC-32C catalogue's check value


def test_event_file_reads_back_like_tensorboardx_writes(tmp_path):
    """The same scalars written by our writer and by tensorboardX parse to the same events."""
    from tensorboardX import SummaryWriter
    logged = [(0, {"train/loss": 5.25, "train/lr": 1e-4}), (300, {"eval/loss": 4.5}),
              (2 ** 40, {"train/loss": -0.125, "train/count": 7})]
    (tmp_path / "ours").mkdir()
    ours = metrics.MetricWriter(str(tmp_path / "ours"))
    reference = SummaryWriter(str(tmp_path / "ref"))
    for step, scalars in logged:
        split = next(iter(scalars)).split("/")[0]
        ours.write(step, split, {k.split("/")[1]: v for k, v in scalars.items()} | {"note": "x"})
        for tag, value in scalars.items():
            reference.add_scalar(tag, value, step)
    ours.close()
    reference.close()

    def rows(folder):
        (path,) = (tmp_path / folder).rglob("events.out.tfevents.*")
        evs = _read_events(path)
        assert evs[0].file_version == "brain.Event:2"
        return sorted((e.step, v.tag, v.simple_value) for e in evs[1:] for v in e.summary.value)

    assert rows("ours") == rows("ref") and len(rows("ours")) == 5
    assert [json.loads(line)["note"] for line in
            (tmp_path / "ours" / "metrics.jsonl").read_text().splitlines()] == ["x"] * 3


def test_cpu_peak_is_measured_once_per_machine_then_read(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(metrics, "measure_matmul_flops", lambda: calls.append(1) or 1e9 * len(calls))
    (tmp_path / "cpu_peak_flops.json").write_text("{not json")  # garbled: measured, rewritten
    first, how = metrics.cpu_peak_flops(str(tmp_path))
    assert (first, how, len(calls)) == (1e9, "measured fp32 matmul", 1)
    again, how = metrics.cpu_peak_flops(str(tmp_path))
    assert again == first and len(calls) == 1 and "measured once" in how
    table = json.loads((tmp_path / "cpu_peak_flops.json").read_text())
    assert table == {metrics.cpu_key(): 1e9}
    assert metrics.cpu_peak_flops(None)[0] == 2e9 and len(calls) == 2  # no cache: always measured
    monkeypatch.setattr(metrics, "cpu_key", lambda: "another CPU")
    assert metrics.cpu_peak_flops(str(tmp_path))[0] == 3e9  # another machine: its own entry
    assert len(json.loads((tmp_path / "cpu_peak_flops.json").read_text())) == 2
    assert list(tmp_path.iterdir()) == [tmp_path / "cpu_peak_flops.json"]  # no temporary left
