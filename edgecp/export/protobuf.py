"""A protobuf walk for ONNX files without the onnx package (the device runtime has none): the fields of one message,
read from a buffer (a memory map), skipping what is not asked for. Used by the runner (which operators a graph
uses) and by concept updates (a graph's initializers).
"""

from __future__ import annotations

from collections.abc import Iterator


def varint(buf, i: int) -> tuple[int, int]:
    """(value, next position) of the varint at buf[i]."""
    value = shift = 0
    while True:
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i
        shift += 7


def fields(buf, start: int, end: int) -> Iterator[tuple[int, int, int | tuple[int, int]]]:
    """(field number, wire type, value) of one message in buf[start:end]: the value is the int of a varint, or the
    (start, end) of a length-delimited field's bytes; fixed-width fields are skipped. ValueError on a wire type no
    ONNX file has."""
    i = start
    while i < end:
        key, i = varint(buf, i)
        wire = key & 7
        if wire == 0:
            v, i = varint(buf, i)
            yield key >> 3, 0, v
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        elif wire == 2:
            n, i = varint(buf, i)
            yield key >> 3, 2, (i, i + n)
            i += n
        else:
            raise ValueError(f"protobuf wire type {wire} at byte {i}: the file is not an ONNX model; export it again")
