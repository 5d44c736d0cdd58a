"""GRPO group statistics and masked whitening: reference / cpp / triton vs verl.

    python -m bench.bench_group_stats [--quick] [--device cpu|cuda]

Sizes are B samples x L tokens. ``grpo/*``: outcome scores of B samples in groups of 8,
GRPO advantages broadcast to the sample's action tokens ([T] output; verl's
``compute_grpo_outcome_advantage`` takes the [B, L] token rewards and mask and returns
[B, L]). ``whiten/*``: ``masked_whiten`` over all B x L tokens, 30% masked (verl's
``masked_whiten``).
"""

from __future__ import annotations

import sys
import warnings

from bench.harness import BenchResult, Unavailable, run_sweep

SIZES = ["64x1024", "256x4096", "512x16384"]
QUICK_SIZES = ["64x1024", "256x4096"]
GROUP = 8


def _verl():
    """verl's (core_algos, torch_functional), or raise Unavailable."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from verl.trainer.ppo import core_algos
            from verl.utils import torch_functional
    except ImportError as exc:
        raise Unavailable(f"verl not importable: {exc}") from exc
    return core_algos, torch_functional


def providers(device: str) -> list[str]:
    impls = ["reference", "cpp", "verl"] if device == "cpu" else ["reference", "triton", "verl"]
    return [f"{op}/{impl}" for op in ("grpo", "whiten") for impl in impls]


def repeat_for(provider: str, size: str) -> int:
    return 5 if provider.endswith(("reference", "verl")) else 20


def _setup(size: str, device: str):
    import torch

    B, L = map(int, size.split("x"))
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(B, generator=g)  # [B]
    ids = torch.arange(B) // GROUP  # [B], dense
    x = torch.randn(B * L, generator=g) * 2 + 1  # [T]
    mask = torch.rand(B * L, generator=g) > 0.3  # [T]
    return [t.to(device) for t in (scores, ids, x, mask)], (B, L)


def warm_up(provider: str, device: str) -> None:
    import torch

    from lightning import kernels

    impl = provider.split("/")[1]
    if impl == "verl":
        _verl()
    elif impl != "reference":
        from lightning.kernels import KernelUnavailableError, _dispatch

        try:
            _dispatch.select("group_stats", torch.device(device), impl, ("cpp", "triton"), "group_stats")
        except KernelUnavailableError as exc:
            raise Unavailable(str(exc)) from exc
        x = torch.ones(8, device=device)
        kernels.group_stats(x, torch.zeros(8, dtype=torch.int64, device=device), impl=impl)
        kernels.masked_whiten(x, impl=impl)


def make_fn(provider: str, size: str, device: str):
    import numpy as np
    import torch

    from lightning import kernels
    from lightning.kernels.group_stats import reference

    op, impl = provider.split("/")
    (scores, ids, x, mask), (B, L) = _setup(size, device)
    mask2 = mask.view(B, L)  # [B, L]
    if op == "grpo":
        if impl == "verl":
            core_algos, _ = _verl()
            token_rewards = torch.zeros(B, L, device=device)  # [B, L]
            token_rewards[:, -1] = scores
            index = np.array(ids.tolist())
            return (lambda: core_algos.compute_grpo_outcome_advantage(token_rewards, mask2.float(), index)), "verl 0.9"

        def fn():
            if impl == "reference":
                adv = reference.grpo_advantage(scores, ids, num_groups=B // GROUP)  # [B]
            else:
                adv = kernels.grpo_advantage(scores, ids, num_groups=B // GROUP, impl=impl)  # [B]
            return adv.repeat_interleave(L) * mask  # [T]

        return fn, "grpo_advantage + broadcast to tokens"
    if impl == "verl":
        _, verl_F = _verl()
        return (lambda: verl_F.masked_whiten(x.view(B, L), mask2.float())), "verl 0.9"
    if impl == "reference":
        return (lambda: reference.masked_whiten(x, mask)), "pure torch, float64 accumulation"
    return (lambda: kernels.masked_whiten(x, mask, impl=impl)), ""


def derived(bench: str, size: str, device: str, measured: dict) -> list[BenchResult]:
    rows = []
    for op in ("grpo", "whiten"):
        verl = measured.get((size, f"{op}/verl"))
        for p in providers(device):
            res = measured.get((size, p))
            if verl and res and p.startswith(op) and not p.endswith("verl"):
                rows.append(BenchResult(bench, p, size, "speedup_vs_verl", verl["median"] / res["median"], "x"))
    return rows


def main(argv: list[str] | None = None) -> list[BenchResult]:
    return run_sweep(sys.modules[__name__], "group_stats", argv)


if __name__ == "__main__":
    main()
