"""The daemon's OTLP/HTTP trace receiver: ``POST /v1/traces`` -> rollouts in the store.

Accepts ``application/x-protobuf`` and ``application/json`` bodies (optionally gzip or
deflate compressed), as the OpenTelemetry Collector's ``otlphttp`` exporter and the SDKs'
OTLP/HTTP exporters send them. Spans are grouped into rollouts and mapped to events by
:mod:`lightning.otel._mapping`; each rollout is stored through
:meth:`lightning._daemon.Daemon.ingest_local`, the same path as server-side capture
(validated, written to the write-ahead log, assembled into a trajectory), so it trains
like any other rollout.

Replies follow the OTLP/HTTP spec: 200 with an ``ExportTraceServiceResponse`` in the
request's encoding (``partial_success`` says how many spans were dropped and why); 400
with a ``google.rpc.Status`` body naming what was malformed (not retryable); 415 for an
unknown content type; 503 with ``Retry-After`` while the trajectory buffer is full or the
daemon is not serving (retryable).

Rollouts already delivered by the runtime over ZeroMQ (``lightning.delivered=true``, set
by the exporter when a runtime is running) are skipped, so a collector may fan the same
traces out to a tracing backend and to the daemon without counting rollouts twice. LLM
calls without token ids are stored as text, ``trainable=False``, and said once.
"""

from __future__ import annotations

import hmac
import time
from collections import Counter
from typing import Any, Protocol

import anyio
import msgspec
import structlog
from anyio.abc import TaskStatus

from .._http import cross_origin, require_key
from .._errors import ProtocolError
from .._protocol import Event, Rejection
from . import _attributes as A
from ._mapping import Assembler, Group, to_events
from ._model import OtelSpan, OtlpDecodeError, OtlpTooLarge, decode_otlp

logger = structlog.get_logger()

__all__ = ["IngestSink", "TraceReceiver"]

_json = msgspec.json.Encoder()


class IngestSink(Protocol):
    """What the receiver stores into: :class:`lightning._daemon.Daemon` fits."""

    def ingest_local(self, event: Event) -> Rejection | None: ...


def _rollout_name(group: Group) -> str:
    """The rollout id its spans name, else its trace (for a refusal message)."""
    for span in group.spans:
        rid = span.attributes.get(A.ROLLOUT_ID)
        if isinstance(rid, str):
            return rid
    return f"of trace {group.trace_id}"


def _status_pb(code: int, message: str) -> bytes:
    """A ``google.rpc.Status`` protobuf (code = 1 varint, message = 2 string)."""
    msg = message.encode()
    return b"\x08" + _varint(code) + b"\x12" + _varint(len(msg)) + msg


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


class TraceReceiver:
    """Turns OTLP trace exports into stored rollouts.

    Args:
        sink: the daemon (``ingest_local``; its ``buffer.full()`` is honoured when present).
        idle_s: a trace with no rollout span and no root span yet becomes a rollout after
            this long without new spans.
        max_body_bytes: larger request bodies are refused with 413.
        max_buffered_spans: spans held while their rollouts are incomplete; more are
            dropped (reported in ``partial_success``).
        api_key: require ``Authorization: Bearer KEY`` (the policy server checks its own
            key before calling :meth:`handle`; this is for :meth:`serve`).

    Raises:
        ValueError: ``idle_s`` is not positive.
    """

    def __init__(self, sink: IngestSink, *, idle_s: float = 30.0,
                 max_body_bytes: int = 64 << 20, max_buffered_spans: int = 1_000_000,
                 api_key: str | None = None) -> None:
        if idle_s <= 0:
            raise ValueError(f"idle_s must be > 0, got {idle_s}")
        self.sink = sink
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes
        self.assembler = Assembler(idle_s=idle_s, max_spans=max_buffered_spans)
        self.counters: Counter[str] = Counter()
        self._warned_untrainable = False
        self.last_rejected_spans = 0

    # ------------------------------------------------------------------ core

    def ingest_spans(self, spans: list[OtelSpan], now: float | None = None) -> list[str]:
        """Buffer ``spans`` and store the rollouts they complete; return problems found.

        ``self.last_rejected_spans`` is the number of these spans that were dropped.

        Raises:
            RuntimeError: the sink is not serving (the daemon's ``serve`` has not started).
        """
        late, overflow = self.assembler.late, self.assembler.dropped_overflow
        self.counters["spans_received"] += len(spans)
        problems = self._store(self.assembler.add(spans, now))
        problems += self._store(self.assembler.expire(now))
        self.last_rejected_spans = 0
        if self.assembler.late > late:
            n = self.assembler.late - late
            self.last_rejected_spans += n
            self.counters["spans_late"] += n
            problems.append(f"{n} span(s) arrived after their rollout was stored and were dropped")
        if self.assembler.dropped_overflow > overflow:
            n = self.assembler.dropped_overflow - overflow
            self.last_rejected_spans += n
            self.counters["spans_dropped_overflow"] += n
            problems.append(f"{n} span(s) dropped: {self.assembler.max_spans} spans are already "
                            "buffered waiting for their rollout or trace root to end")
        return problems

    def flush(self, *, everything: bool = False) -> list[str]:
        """Store rollouts of idle traces (all buffered traces with ``everything``)."""
        return self._store(self.assembler.expire(everything=everything))

    def _store(self, groups: list[Any]) -> list[str]:
        problems: list[str] = []
        for g in groups:
            try:
                mapped = to_events(g, source="otlp")
            except (ProtocolError, RecursionError, ValueError, TypeError) as exc:
                # One rollout's spans that break the mapping (a 100k-deep JSON string, a
                # token id beyond int32) are refused alone: the others, and the periodic
                # flush that stores idle traces, carry on.
                self.counters["rollouts_unmappable"] += 1
                problems.append(f"rollout {_rollout_name(g)} could not be mapped and was "
                                f"dropped: {type(exc).__name__}: {str(exc)[:200]}")
                continue
            if mapped is None:
                self.counters["rollouts_skipped_delivered"] += 1
                continue
            if mapped.skipped_rewards:
                self.counters["rewards_invalid"] += mapped.skipped_rewards
                problems.append(f"rollout {mapped.rollout_id}: {mapped.skipped_rewards} reward(s) "
                                "were not finite numbers and were dropped")
            first = self.sink.ingest_local(mapped.events[0])
            if first is not None:
                if first.code == "duplicate_rollout":  # an exporter retried: idempotent
                    self.counters["rollouts_duplicate"] += 1
                else:
                    self.counters["rollouts_rejected"] += 1
                    problems.append(f"rollout {mapped.rollout_id}: {first.reason}")
                continue
            for ev in mapped.events[1:]:
                rej = self.sink.ingest_local(ev)
                if rej is not None:
                    self.counters["events_rejected"] += 1
                    problems.append(f"rollout {mapped.rollout_id}: {rej.reason}")
            self.counters["rollouts_stored"] += 1
            self.counters["transitions_stored"] += mapped.events[-1].n_transitions
            if mapped.untrainable:
                self.counters["transitions_untrainable"] += mapped.untrainable
                if not self._warned_untrainable:
                    self._warned_untrainable = True
                    logger.warning(
                        "otel.no_token_ids",
                        rollout_id=mapped.rollout_id,
                        consequence="LLM spans without lightning.prompt_token_ids / "
                        "lightning.response_token_ids are stored as text and are NOT "
                        "trainable",
                        fix="export from apps that call the policy server with "
                        "lightning.otel.instrument(include_token_ids=True), or add the "
                        "lightning.* token attributes to the LLM spans",
                    )
        return problems

    # ------------------------------------------------------------------ HTTP

    async def handle(self, request: Any) -> Any:
        """Starlette endpoint for ``POST /v1/traces``."""
        from starlette.responses import Response

        ctype = request.headers.get("content-type", "")
        as_json = ctype.split(";", 1)[0].strip().lower() == "application/json"

        def error(status: int, code: int, message: str, **headers: str) -> Any:
            self.counters[f"http_{status}"] += 1
            if status < 500:
                logger.warning("otel.request_refused", status=status, reason=message)
            if as_json:
                body, mt = _json.encode({"code": code, "message": message}), "application/json"
            else:
                body, mt = _status_pb(code, message), "application/x-protobuf"
            return Response(body, status_code=status, media_type=mt, headers=headers or None)

        if self.api_key is not None and not hmac.compare_digest(
                request.headers.get("authorization", "").encode(),
                f"Bearer {self.api_key}".encode()):
            return error(401, 16, "invalid or missing API key: send 'Authorization: Bearer KEY' "
                         "(the collector's otlphttp exporter: headers: Authorization)")
        refused = cross_origin(request)
        if refused is not None:
            return error(403, 7, refused)
        if ctype.split(";", 1)[0].strip().lower() not in ("application/json",
                                                         "application/x-protobuf"):
            return error(415, 3, f"unsupported Content-Type {ctype!r}: OTLP/HTTP is "
                         "application/x-protobuf or application/json")
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            return error(413, 8, f"body of {declared} bytes exceeds the limit of "
                         f"{self.max_body_bytes}: export smaller batches")
        buffer = getattr(self.sink, "buffer", None)
        if buffer is not None and buffer.full():
            return error(503, 14, "the trajectory buffer is full: retry later",
                         **{"Retry-After": "1"})
        body = await request.body()
        if len(body) > self.max_body_bytes:
            return error(413, 8, f"body of {len(body)} bytes exceeds the limit of "
                         f"{self.max_body_bytes}: export smaller batches")
        try:
            spans = decode_otlp(body, ctype, request.headers.get("content-encoding", ""),
                                max_bytes=self.max_body_bytes)
        except OtlpTooLarge as exc:
            return error(413, 8, str(exc))
        except OtlpDecodeError as exc:
            return error(400, 3, f"malformed OTLP trace export: {exc}")
        except RecursionError:
            return error(400, 3, "malformed OTLP trace export: nested too deeply")
        except OverflowError as exc:  # e.g. nanoseconds beyond what a float holds
            return error(400, 3, f"malformed OTLP trace export: a number is out of range ({exc})")
        except ImportError as exc:
            return error(415, 3, str(exc))
        try:
            problems = self.ingest_spans(spans, time.monotonic())
        except RuntimeError as exc:
            return error(503, 14, str(exc), **{"Retry-After": "1"})
        return self._ok(as_json, problems)

    def _ok(self, as_json: bool, problems: list[str]) -> Any:
        from starlette.responses import Response

        self.counters["http_200"] += 1
        dropped = self.last_rejected_spans
        message = "; ".join(problems)[:2000]
        if as_json:
            body: dict[str, Any] = {}
            if problems:
                body["partialSuccess"] = {"rejectedSpans": str(dropped), "errorMessage": message}
            return Response(_json.encode(body), media_type="application/json")
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceResponse,
        )

        resp = ExportTraceServiceResponse()
        if problems:
            resp.partial_success.rejected_spans = dropped
            resp.partial_success.error_message = message
        return Response(resp.SerializeToString(), media_type="application/x-protobuf")

    # ------------------------------------------------------------------ service

    async def run(self, *, interval_s: float | None = None,
                  task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Store idle traces periodically until cancelled; on cancel, store them all."""
        interval = interval_s or min(1.0, self.assembler.idle_s / 2)
        task_status.started()
        try:
            while True:
                await anyio.sleep(interval)
                self.flush()
        finally:  # synchronous: nothing here can be cancelled half-way
            pending = len(self.assembler)
            try:
                self.flush(everything=True)
            except Exception as exc:  # noqa: BLE001 - the daemon stopped first
                logger.warning("otel.unstored_at_shutdown", spans=pending,
                               error=f"{type(exc).__qualname__}: {exc}",
                               hint="spans of unfinished traces were acknowledged but not "
                               "stored")

    def routes(self) -> list[Any]:
        """The Starlette route: ``POST /v1/traces``."""
        from starlette.routing import Route

        return [Route("/v1/traces", self.handle, methods=["POST"])]

    async def serve(self, *, host: str = "127.0.0.1", port: int = 4318,
                    task_status: TaskStatus[str] = anyio.TASK_STATUS_IGNORED) -> None:
        """Serve ``POST /v1/traces`` alone (a daemon without a policy server).

        ``task_status.started`` gets the endpoint URL (``http://host:port/v1/traces``).

        Raises:
            OSError: the port could not be bound.
            ConfigError: ``host`` is not loopback and there is no ``api_key``.
        """
        import uvicorn
        from starlette.applications import Starlette

        require_key(host, self.api_key, "OTLP traces")

        app = Starlette(routes=self.routes())
        config = uvicorn.Config(app, host=host, port=port, log_level="warning",
                                access_log=False, lifespan="off", timeout_graceful_shutdown=2)
        server = uvicorn.Server(config)
        server.install_signal_handlers = lambda: None
        done = anyio.Event()

        async def run_server() -> None:
            with anyio.CancelScope(shield=True):
                try:
                    await server.serve()
                finally:
                    done.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(run_server)
            while not server.started:
                if done.is_set():
                    raise OSError(f"the OTLP receiver could not start on {host}:{port}")
                await anyio.sleep(0.01)
            bound = server.servers[0].sockets[0].getsockname()[1]
            await tg.start(self.run)
            url = f"http://{host}:{bound}/v1/traces"
            logger.info("otel.listening", endpoint=url)
            task_status.started(url)
            try:
                await anyio.sleep_forever()
            finally:
                server.should_exit = True
                with anyio.CancelScope(shield=True):
                    await done.wait()
