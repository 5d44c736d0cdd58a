"""The OpenAI-compatible policy server (imports starlette; not imported by ``lightning``)."""

from ._chat import RequestError
from ._server import ROLLOUT_HEADER, CaptureSink, PolicyServer

__all__ = ["ROLLOUT_HEADER", "CaptureSink", "PolicyServer", "RequestError"]
