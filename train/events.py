"""TensorBoard event files for scalar metrics, written without a TensorBoard package.

An event file is a sequence of TFRecords (a little-endian uint64 length, its masked CRC-32C,
the bytes, their masked CRC-32C), each holding one serialized `Event` protocol buffer: the
first one names the file format ("brain.Event:2"), each later one carries a step and a
`Summary` of (tag, float) values. The few fields used are encoded by hand here, so a run does
not import tensorboardX, which imports torch whenever torch is installed (1.6 s per start).
"""
import os
import socket
import struct
import time

_CRC32C_TABLE = []
for _byte in range(256):
    _crc = _byte
    for _ in range(8):
        _crc = (_crc >> 1) ^ (0x82F63B78 if _crc & 1 else 0)  # Castagnoli, reflected
    _CRC32C_TABLE.append(_crc)


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2): strings and nested messages."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _event(wall_time: float, step: int, body: bytes) -> bytes:
    """Event{wall_time = 1 (double), step = 2 (int64)} followed by `body`'s fields."""
    return b"\x09" + struct.pack("<d", wall_time) + b"\x10" + _varint(step) + body


def scalars_event(step: int, scalars: dict, wall_time: float | None = None) -> bytes:
    """An Event whose summary (field 5) holds one Value{tag = 1, simple_value = 2} per scalar."""
    values = b"".join(
        _field(1, _field(1, tag.encode()) + b"\x15" + struct.pack("<f", float(value)))
        for tag, value in scalars.items())
    return _event(time.time() if wall_time is None else wall_time, step, _field(5, values))


def record(data: bytes) -> bytes:
    """One TFRecord around `data`."""
    header = struct.pack("<Q", len(data))
    return (header + struct.pack("<I", _masked_crc(header)) + data
            + struct.pack("<I", _masked_crc(data)))


class EventWriter:
    """Appends scalar events to a new events.out.tfevents.* file under `logdir`."""

    def __init__(self, logdir: str):
        os.makedirs(logdir, exist_ok=True)
        now = time.time()
        name = f"events.out.tfevents.{int(now)}.{socket.gethostname()}.{os.getpid()}"
        self.path = os.path.join(logdir, name)
        self._file = open(self.path, "ab")
        self._file.write(record(_event(now, 0, _field(3, b"brain.Event:2"))))
        self._file.flush()

    def write(self, step: int, scalars: dict):
        if scalars:
            self._file.write(record(scalars_event(step, scalars)))
            self._file.flush()

    def close(self):
        self._file.close()
