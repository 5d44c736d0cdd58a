"""The toy agent of toy_agent.py sampling the way many frameworks and users do:
``temperature=0.7, top_p=0.9`` (issue 15's reproduction). ``SAMPLING_AGENT_PARAMS`` (JSON)
overrides the sampling parameters, e.g. ``{"temperature": 0.3}`` or ``{"top_k": 20}``."""

from __future__ import annotations

import json
import os

import openai

import lightning
from toy_agent import dataset, favoured  # noqa: F401  (dataset is the runner's)

PARAMS = json.loads(os.environ.get("SAMPLING_AGENT_PARAMS") or '{"temperature": 0.7, "top_p": 0.9}')


@lightning.rollout(name="sampling_agent")
async def agent(task: dict) -> float:
    ep = lightning.llm()
    top_k = PARAMS.get("top_k")
    async with openai.AsyncOpenAI(base_url=ep.base_url, api_key=ep.api_key) as client:
        r = await client.chat.completions.create(
            model=ep.model,
            messages=[{"role": "user", "content": f"Say something favoured #{task['id']}"}],
            max_tokens=8,
            **{k: v for k, v in PARAMS.items() if k != "top_k"},
            **({"extra_body": {"top_k": top_k}} if top_k is not None else {}),
        )
    ids = r.choices[0].model_extra["token_ids"]
    fav = favoured()
    return sum(1 for t in ids if t in fav) / max(len(ids), 1)
