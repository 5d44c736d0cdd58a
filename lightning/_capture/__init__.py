"""Automatic capture of LLM calls made inside a rollout.

``lightning.init()`` / ``lightning.session()`` call :func:`install`; from then on, calls
made with the official ``openai`` package (and so by LangChain, the OpenAI Agents SDK,
AutoGen and anything else built on it) inside a ``@lightning.rollout`` function become
transitions: prompt and response token ids, sampler log-probs, policy version, latency,
the request, the text and the tool calls. See :mod:`lightning._capture.openai` for the
hook point and the token-id contract with the policy server.

Nothing here imports ``openai`` until :func:`install` runs, and :func:`install` does
nothing when the package is not installed, so ``import lightning`` stays light.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Sequence

import structlog

logger = structlog.get_logger()

__all__ = ["install", "uninstall"]


def install(*, token_id_base_urls: Sequence[str] = ()) -> None:
    """Capture LLM calls made with the ``openai`` package inside rollouts (idempotent).

    ``token_id_base_urls``: base URLs (prefixes) of servers that return token ids, the
    lightning policy server and vLLM; requests to them ask for token ids and log-probs.
    Calling again replaces the list. Never raises: a failure is logged and the app runs
    uncaptured.
    """
    if "openai" not in sys.modules and importlib.util.find_spec("openai") is None:
        logger.debug("capture.skipped", library="openai", reason="not installed")
        return
    try:
        from . import openai as _openai

        _openai.install(token_id_base_urls)
    except Exception as exc:  # noqa: BLE001 - capture is optional, the app is not
        logger.warning(
            "capture.install_failed",
            library="openai",
            error=f"{type(exc).__qualname__}: {exc}",
            hint="LLM calls are not captured; record them with lightning.record_transition",
        )


def uninstall() -> None:
    """Stop capturing and restore the libraries' own methods (idempotent)."""
    mod = sys.modules.get(f"{__name__}.openai")
    if mod is not None:
        mod.uninstall()
