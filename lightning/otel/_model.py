"""Spans in one neutral shape, from OTLP/HTTP bodies (protobuf, JSON) or SDK spans.

:class:`OtelSpan` is what the mapping reads, whatever the span came from: the daemon's
OTLP receiver decodes request bodies with :func:`decode_otlp`, the in-process bridge
converts the SDK's ``ReadableSpan`` with :func:`from_sdk_span`. Ids are lowercase hex;
times are Unix seconds; attribute values are Python scalars or lists (OTLP ``kvlist``
values become dicts, ``bytes`` stay bytes).

The protobuf encoding needs ``opentelemetry-proto`` (the ``otel`` extra), imported on the
first protobuf request; JSON needs nothing but msgspec.
"""

from __future__ import annotations

import zlib
from typing import Any

import msgspec

__all__ = [
    "OtelEvent",
    "OtelSpan",
    "OtlpDecodeError",
    "OtlpTooLarge",
    "decode_otlp",
    "from_sdk_span",
]


class OtlpDecodeError(ValueError):
    """The OTLP request body is malformed; the message says what was wrong."""


class OtelEvent(msgspec.Struct, frozen=True, gc=False):
    name: str
    time: float
    attributes: dict[str, Any]


class OtelSpan(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    trace_id: str
    span_id: str
    parent_span_id: str = ""
    name: str = ""
    kind: int = 0
    start: float = 0.0
    end: float = 0.0
    attributes: dict[str, Any] = {}
    events: tuple[OtelEvent, ...] = ()
    status_code: int = 0
    """0 unset, 1 ok, 2 error (OTLP's StatusCode)."""
    status_message: str = ""
    resource: dict[str, Any] = {}
    scope: str = ""


# ------------------------------------------------------------------ request bodies


class OtlpTooLarge(OtlpDecodeError):
    """The (decompressed) body exceeds the receiver's limit."""


def _decompress(body: bytes, encoding: str, max_bytes: int) -> bytes:
    encoding = encoding.strip().lower()
    if encoding in ("gzip", "x-gzip", "deflate"):
        # bounded: a small compressed body must not expand without limit
        d = zlib.decompressobj(16 + zlib.MAX_WBITS if encoding != "deflate" else zlib.MAX_WBITS)
        try:
            out = d.decompress(body, max_bytes + 1)
        except zlib.error as exc:
            raise OtlpDecodeError(f"body is not valid {encoding} ({exc})") from exc
        if len(out) > max_bytes or d.unconsumed_tail:
            raise OtlpTooLarge(f"decompressed body exceeds the limit of {max_bytes} bytes: "
                               "export smaller batches")
        if not d.eof:
            raise OtlpDecodeError(f"body is not valid {encoding} (truncated)")
        return out
    if encoding not in ("", "identity"):
        raise OtlpDecodeError(
            f"unsupported Content-Encoding {encoding!r}: send gzip, deflate or identity"
        )
    return body


def decode_otlp(body: bytes, content_type: str, content_encoding: str = "",
                *, max_bytes: int = 64 << 20) -> list[OtelSpan]:
    """Decode an OTLP/HTTP ``ExportTraceServiceRequest`` body into spans.

    Raises:
        OtlpTooLarge: the body decompresses to more than ``max_bytes``.
        OtlpDecodeError: unknown content type, bad compression, or a body that is not a
            valid request of the declared encoding (the message names the field).
        ImportError: a protobuf body arrived and ``opentelemetry-proto`` is not installed.
    """
    body = _decompress(body, content_encoding, max_bytes)
    ctype = content_type.split(";", 1)[0].strip().lower()
    if ctype == "application/x-protobuf":
        return _decode_protobuf(body)
    if ctype == "application/json":
        return _decode_json(body)
    raise OtlpDecodeError(
        f"unsupported Content-Type {content_type!r}: OTLP/HTTP is application/x-protobuf "
        "or application/json"
    )


# ------------------------------------------------------------------ protobuf


def _pb_value(v: Any) -> Any:
    which = v.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return [_pb_value(x) for x in v.array_value.values]
    if which == "kvlist_value":
        return {kv.key: _pb_value(kv.value) for kv in v.kvlist_value.values}
    return getattr(v, which)


def _pb_attrs(kvs: Any) -> dict[str, Any]:
    return {kv.key: _pb_value(kv.value) for kv in kvs}


def _decode_protobuf(body: bytes) -> list[OtelSpan]:
    try:
        from google.protobuf.message import DecodeError
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
        )
    except ImportError as exc:
        raise ImportError(
            "decoding OTLP protobuf needs opentelemetry-proto: pip install "
            "'lightning-rl[otel]' (or send application/json)"
        ) from exc
    req = ExportTraceServiceRequest()
    try:
        req.ParseFromString(body)
    except DecodeError as exc:
        raise OtlpDecodeError(f"body is not a protobuf ExportTraceServiceRequest ({exc})") from exc
    out = []
    for rs in req.resource_spans:
        resource = _pb_attrs(rs.resource.attributes)
        for ss in rs.scope_spans:
            scope = ss.scope.name
            for s in ss.spans:
                out.append(
                    OtelSpan(
                        trace_id=_hex_id(s.trace_id, 16, "trace_id"),
                        span_id=_hex_id(s.span_id, 8, "span_id"),
                        parent_span_id=s.parent_span_id.hex(),
                        name=s.name,
                        kind=s.kind,
                        start=s.start_time_unix_nano / 1e9,
                        end=s.end_time_unix_nano / 1e9,
                        attributes=_pb_attrs(s.attributes),
                        events=tuple(
                            OtelEvent(e.name, e.time_unix_nano / 1e9, _pb_attrs(e.attributes))
                            for e in s.events
                        ),
                        status_code=s.status.code,
                        status_message=s.status.message,
                        resource=resource,
                        scope=scope,
                    )
                )
    return out


def _hex_id(raw: bytes, size: int, what: str) -> str:
    if len(raw) != size or not any(raw):
        raise OtlpDecodeError(
            f"span {what} must be {size} bytes and not all zero, got {raw.hex()!r}")
    return raw.hex()


# ------------------------------------------------------------------ JSON
# OTLP/JSON (https://opentelemetry.io/docs/specs/otlp/#json-protobuf-encoding): protobuf
# JSON mapping with lowerCamelCase keys, except that trace and span ids are hex strings;
# 64-bit integers may be strings, enums are integers.

_json = msgspec.json.Decoder()


def _j_value(v: Any, where: str) -> Any:
    if not isinstance(v, dict):
        raise OtlpDecodeError(f"{where}: an AnyValue must be an object, got {type(v).__name__}")
    if not v:
        return None
    if "stringValue" in v:
        return v["stringValue"]
    if "boolValue" in v:
        return bool(v["boolValue"])
    if "intValue" in v:
        try:
            return int(v["intValue"])
        except (TypeError, ValueError):
            raise OtlpDecodeError(
                f"{where}: intValue {v['intValue']!r} is not an integer") from None
    if "doubleValue" in v:
        try:
            return float(v["doubleValue"])
        except (TypeError, ValueError):
            raise OtlpDecodeError(
                f"{where}: doubleValue {v['doubleValue']!r} is not a number") from None
    if "arrayValue" in v:
        return [_j_value(x, where) for x in (v["arrayValue"] or {}).get("values") or ()]
    if "kvlistValue" in v:
        return _j_attrs((v["kvlistValue"] or {}).get("values"), where)
    if "bytesValue" in v:
        import base64

        try:
            return base64.b64decode(v["bytesValue"])
        except (TypeError, ValueError):
            raise OtlpDecodeError(f"{where}: bytesValue is not base64") from None
    raise OtlpDecodeError(f"{where}: unknown AnyValue keys {sorted(v)}")


def _j_attrs(kvs: Any, where: str) -> dict[str, Any]:
    if kvs is None:
        return {}
    if not isinstance(kvs, list):
        raise OtlpDecodeError(f"{where}: attributes must be a list of {{key, value}}")
    out = {}
    for kv in kvs:
        if not isinstance(kv, dict) or not isinstance(kv.get("key"), str):
            raise OtlpDecodeError(f"{where}: each attribute needs a string 'key'")
        out[kv["key"]] = _j_value(kv.get("value") or {}, f"{where} attribute {kv['key']!r}")
    return out


def _j_id(value: Any, size: int, what: str, where: str, *, optional: bool = False) -> str:
    if optional and not value:
        return ""
    if not isinstance(value, str) or len(value) != 2 * size:
        raise OtlpDecodeError(f"{where}: {what} must be {2 * size} hex characters, got {value!r}")
    try:
        raw = bytes.fromhex(value)
    except ValueError:
        raise OtlpDecodeError(f"{where}: {what} {value!r} is not hex") from None
    if not any(raw):
        raise OtlpDecodeError(f"{where}: {what} must not be all zero")
    return value.lower()


def _j_nanos(value: Any, what: str, where: str) -> float:
    try:
        return int(value or 0) / 1e9
    except (TypeError, ValueError):
        raise OtlpDecodeError(
            f"{where}: {what} {value!r} is not an integer of nanoseconds") from None


_KINDS = {f"SPAN_KIND_{n}": i for i, n in enumerate(
    ("UNSPECIFIED", "INTERNAL", "SERVER", "CLIENT", "PRODUCER", "CONSUMER"))}
_CODES = {"STATUS_CODE_UNSET": 0, "STATUS_CODE_OK": 1, "STATUS_CODE_ERROR": 2}


def _enum(value: Any, names: dict[str, int], what: str, where: str) -> int:
    """OTLP/JSON enums are integers; protobuf's JSON mapping also allows their names."""
    if type(value) is int:
        return value
    if isinstance(value, str) and value in names:
        return names[value]
    raise OtlpDecodeError(f"{where}: {what} must be an integer (or one of {sorted(names)}), "
                          f"got {value!r}")


def _list(obj: dict[str, Any], key: str, where: str) -> list[Any]:
    v = obj.get(key)
    if v is None:
        return []
    if not isinstance(v, list):
        raise OtlpDecodeError(f"{where}: {key} must be a list")
    return v


def _decode_json(body: bytes) -> list[OtelSpan]:
    try:
        req = _json.decode(body)
    except msgspec.DecodeError as exc:
        raise OtlpDecodeError(f"body is not valid JSON ({exc})") from exc
    if not isinstance(req, dict):
        raise OtlpDecodeError("body must be a JSON object with resourceSpans")
    out = []
    for i, rs in enumerate(_list(req, "resourceSpans", "request")):
        where = f"resourceSpans[{i}]"
        if not isinstance(rs, dict):
            raise OtlpDecodeError(f"{where} must be an object")
        resource = _j_attrs((rs.get("resource") or {}).get("attributes"), where + ".resource")
        for j, ss in enumerate(_list(rs, "scopeSpans", where)):
            w2 = f"{where}.scopeSpans[{j}]"
            if not isinstance(ss, dict):
                raise OtlpDecodeError(f"{w2} must be an object")
            scope = str((ss.get("scope") or {}).get("name") or "")
            for k, s in enumerate(_list(ss, "spans", w2)):
                w = f"{w2}.spans[{k}]"
                if not isinstance(s, dict):
                    raise OtlpDecodeError(f"{w} must be an object")
                status = s.get("status") or {}
                kind = _enum(s.get("kind", 0), _KINDS, "kind", w)
                code = _enum(status.get("code", 0), _CODES, "status.code", w)
                events = []
                for n, e in enumerate(_list(s, "events", w)):
                    if not isinstance(e, dict):
                        raise OtlpDecodeError(f"{w}.events[{n}] must be an object")
                    events.append(OtelEvent(
                        str(e.get("name") or ""),
                        _j_nanos(e.get("timeUnixNano"), "timeUnixNano", f"{w}.events[{n}]"),
                        _j_attrs(e.get("attributes"), f"{w}.events[{n}]"),
                    ))
                out.append(
                    OtelSpan(
                        trace_id=_j_id(s.get("traceId"), 16, "traceId", w),
                        span_id=_j_id(s.get("spanId"), 8, "spanId", w),
                        parent_span_id=_j_id(s.get("parentSpanId"), 8, "parentSpanId", w,
                                             optional=True),
                        name=str(s.get("name") or ""),
                        kind=kind,
                        start=_j_nanos(s.get("startTimeUnixNano"), "startTimeUnixNano", w),
                        end=_j_nanos(s.get("endTimeUnixNano"), "endTimeUnixNano", w),
                        attributes=_j_attrs(s.get("attributes"), w),
                        events=tuple(events),
                        status_code=code,
                        status_message=str(status.get("message") or ""),
                        resource=resource,
                        scope=scope,
                    )
                )
    return out


# ------------------------------------------------------------------ SDK spans


def _sdk_attrs(attrs: Any) -> dict[str, Any]:
    if not attrs:
        return {}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in attrs.items()}


def from_sdk_span(span: Any) -> OtelSpan:
    """An ``opentelemetry.sdk.trace.ReadableSpan`` as an :class:`OtelSpan`.

    A span whose parent is remote (the request came from another service) is this
    process's root: it gets no parent, so its trace ends here when it ends.
    """
    ctx = span.context
    parent = span.parent
    if parent is not None and parent.is_remote:
        parent = None
    resource = getattr(span, "resource", None)
    scope = getattr(span, "instrumentation_scope", None)
    return OtelSpan(
        trace_id=f"{ctx.trace_id:032x}",
        span_id=f"{ctx.span_id:016x}",
        parent_span_id=f"{parent.span_id:016x}" if parent is not None else "",
        name=span.name,
        kind=int(span.kind.value) + 1,  # SDK INTERNAL=0, OTLP INTERNAL=1
        start=(span.start_time or 0) / 1e9,
        end=(span.end_time or 0) / 1e9,
        attributes=_sdk_attrs(span.attributes),
        events=tuple(
            OtelEvent(e.name, e.timestamp / 1e9, _sdk_attrs(e.attributes)) for e in span.events
        ),
        status_code=int(span.status.status_code.value),
        status_message=span.status.description or "",
        resource=_sdk_attrs(resource.attributes) if resource is not None else {},
        scope=scope.name if scope is not None else "",
    )
