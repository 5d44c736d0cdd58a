"""Inference engines: the interface (:mod:`lightning.engine.base`) and a torch engine.

``import lightning.engine`` is light (msgspec only); the torch engine is imported
explicitly: ``from lightning.engine.torch_engine import TorchEngine``.
"""

from lightning.engine.base import (
    Choice,
    CompletionDelta,
    ContextLengthError,
    EngineClosedError,
    EngineError,
    FinishReason,
    GenerationResult,
    InferenceEngine,
    InvalidRequestError,
    SamplingParams,
    Weights,
    WeightUpdateError,
)

__all__ = [
    "Choice",
    "CompletionDelta",
    "ContextLengthError",
    "EngineClosedError",
    "EngineError",
    "FinishReason",
    "GenerationResult",
    "InferenceEngine",
    "InvalidRequestError",
    "SamplingParams",
    "WeightUpdateError",
    "Weights",
]
