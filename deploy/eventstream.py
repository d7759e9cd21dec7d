"""Encoder for `application/vnd.amazon.eventstream`, the framing of InvokeEndpointWithResponseStream.

botocore only decodes this format (`botocore.eventstream.EventStreamBuffer`), so the local runtime
needs its own encoder. One message on the wire is:

    prelude:  total_length (uint32 BE) | headers_length (uint32 BE) | prelude_crc (CRC32 of the 8 bytes)
    headers:  name_len (uint8) | name (utf-8) | value_type (uint8) | value ...   (repeated)
    payload:  raw bytes
    trailer:  message_crc (CRC32 of everything above)

Only string header values (type 7: uint16 BE length + utf-8) are needed by SageMaker's frames.
The frames the service sends (botocore's sagemaker-runtime model, shape `ResponseStream`):
`PayloadPart` events carrying raw bytes, and `ModelStreamError` / `InternalStreamFailure` exceptions
carrying a JSON body.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Iterable, Iterator, Mapping

CONTENT_TYPE = "application/vnd.amazon.eventstream"
_STRING = 7  # header value type: string
_PRELUDE = struct.Struct(">II")
_CRC = struct.Struct(">I")
# Limits botocore enforces when decoding (botocore/eventstream.py): stay inside them when encoding.
MAX_HEADERS_LENGTH = 128 * 1024
MAX_PAYLOAD_LENGTH = 24 * 1024 * 1024


def _crc32(data: bytes, seed: int = 0) -> int:
    return zlib.crc32(data, seed) & 0xFFFFFFFF


def encode_headers(headers: Mapping[str, str]) -> bytes:
    """Encode string headers in insertion order."""
    out = bytearray()
    for name, value in headers.items():
        raw_name, raw_value = name.encode("utf-8"), value.encode("utf-8")
        if len(raw_name) > 255:
            raise ValueError(f"header name longer than 255 bytes: {name!r}")
        if len(raw_value) > 0xFFFF:
            raise ValueError(f"header value longer than 65535 bytes: {name!r}")
        out += bytes([len(raw_name)]) + raw_name + bytes([_STRING]) + struct.pack(">H", len(raw_value)) + raw_value
    return bytes(out)


def encode_message(headers: Mapping[str, str], payload: bytes) -> bytes:
    """One complete, CRC-checked event stream message."""
    raw_headers = encode_headers(headers)
    if len(raw_headers) > MAX_HEADERS_LENGTH or len(payload) > MAX_PAYLOAD_LENGTH:
        raise ValueError("event stream message over botocore's header or payload limit")
    total = _PRELUDE.size + _CRC.size + len(raw_headers) + len(payload) + _CRC.size
    prelude = _PRELUDE.pack(total, len(raw_headers))
    head = prelude + _CRC.pack(_crc32(prelude)) + raw_headers + payload
    return head + _CRC.pack(_crc32(head))


def payload_part(data: bytes) -> bytes:
    """A `PayloadPart` event: the model's bytes, exactly as the container wrote them."""
    headers = {":event-type": "PayloadPart", ":content-type": "application/octet-stream", ":message-type": "event"}
    return encode_message(headers, bytes(data))


def exception_frame(exception_type: str, body: Mapping[str, str]) -> bytes:
    """An exception message (`:message-type` exception); botocore raises `EventStreamError` on it."""
    headers = {":exception-type": exception_type, ":content-type": "application/json", ":message-type": "exception"}
    return encode_message(headers, json.dumps(dict(body)).encode("utf-8"))


def model_stream_error(message: str, error_code: str) -> bytes:
    """`ModelStreamError`: ErrorCode is `ModelInvocationTimeExceeded` or `StreamBroken` on the service."""
    return exception_frame("ModelStreamError", {"Message": message, "ErrorCode": error_code})


def internal_stream_failure(message: str) -> bytes:
    """`InternalStreamFailure`: the service's own failure while streaming."""
    return exception_frame("InternalStreamFailure", {"Message": message})


def split_parts(chunks: Iterable[bytes], size: int) -> Iterator[bytes]:
    """Cut every chunk into parts of at most `size` bytes, never merging two chunks."""
    if size < 1:
        raise ValueError("part size must be at least 1 byte")
    for chunk in chunks:
        for start in range(0, len(chunk), size):
            yield chunk[start:start + size]


def regroup_parts(chunks: Iterable[bytes], size: int) -> Iterator[bytes]:
    """Re-cut the byte stream into parts of exactly `size` bytes (the last may be shorter).

    Part boundaries then fall anywhere: one part holds the end of an event and the start of the
    next, as real SageMaker parts do when the container writes faster than the client reads.
    """
    if size < 1:
        raise ValueError("regroup size must be at least 1 byte")
    pending = bytearray()
    for chunk in chunks:
        pending += chunk
        while len(pending) >= size:
            yield bytes(pending[:size])
            del pending[:size]
    if pending:
        yield bytes(pending)
