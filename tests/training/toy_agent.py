"""A toy agent for the training tests: reward = share of "favoured" tokens in its reply.

Favoured tokens are those whose output embedding points along a fixed random direction
(half the vocabulary). A random tiny model samples them half the time (reward ~0.5); the
policy can raise that only by learning (moving its last hidden state along the
direction), which makes "the reward rises" a real test of the whole loop.
"""

from __future__ import annotations

import openai

import lightning

_favoured: set[int] | None = None


def favoured() -> set[int]:
    """Token ids whose (tied) embedding has a positive projection on a fixed direction."""
    global _favoured
    if _favoured is None:
        import torch
        from safetensors.torch import load_file

        from lightning.models import tiny_model_path

        weights = load_file(str(tiny_model_path() / "model.safetensors"))
        emb = weights.get("lm_head.weight", weights["model.embed_tokens.weight"])  # [V, H]
        u = torch.randn(emb.shape[1], generator=torch.Generator().manual_seed(0))  # [H]
        _favoured = set((emb.float() @ u > 0).nonzero().squeeze(-1).tolist())
    return _favoured


@lightning.rollout(name="even_tokens")
async def agent(task: dict) -> float:
    ep = lightning.llm()
    async with openai.AsyncOpenAI(base_url=ep.base_url, api_key=ep.api_key) as client:
        r = await client.chat.completions.create(
            model=ep.model,
            messages=[{"role": "user", "content": f"Say something favoured #{task['id']}"}],
            max_tokens=8,
            temperature=1.0,
        )
    ids = r.choices[0].model_extra["token_ids"]
    fav = favoured()
    return sum(1 for t in ids if t in fav) / max(len(ids), 1)


def dataset(seed: int = 0) -> tuple[list[dict], list[dict]]:
    return [{"id": i} for i in range(16)], [{"id": 100 + i} for i in range(8)]
