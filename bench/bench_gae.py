"""GAE over packed sequences: reference / cpp / triton / cuda vs verl's compute_gae_advantage_return.

    python -m bench.bench_gae [--quick] [--device cpu|cuda]

Sizes are B sequences x L tokens (all full length, so verl's padded [B, L] batch holds
the same tokens as our packed one), 30% of tokens masked in blocks (tool output).
verl's function also whitens the advantages with the mask, so ``cpp+whiten`` and
``triton+whiten`` (GAE then ``masked_whiten``) are the like-for-like rows; the speed-up
rows divide verl's median time by theirs. On CUDA, ``bw_bound`` is the time to move the
op's minimum traffic (rewards, values, mask in; advantages, returns out: 17 B/token) at
the device-to-device copy bandwidth measured in the same run.
"""

from __future__ import annotations

import sys
import warnings

from bench.harness import BenchResult, Unavailable, run_sweep

SIZES = ["64x1024", "256x4096", "512x16384"]
QUICK_SIZES = ["64x1024", "256x4096"]
GAMMA, LAM = 0.99, 0.95
BYTES_PER_TOKEN = 4 + 4 + 1 + 4 + 4


def _verl():
    """verl's core_algos, or raise Unavailable."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from verl.trainer.ppo import core_algos
    except ImportError as exc:
        raise Unavailable(f"verl not importable: {exc}") from exc
    return core_algos


def providers(device: str) -> list[str]:
    if device == "cpu":
        return ["reference", "cpp", "cpp+whiten", "verl"]
    return ["reference", "triton", "triton+whiten", "cuda", "verl"]


def repeat_for(provider: str, size: str) -> int:
    B, L = map(int, size.split("x"))
    slow = provider in ("reference", "verl")
    return 3 if slow and B * L > 2_000_000 else (5 if slow else 20)


def _setup(size: str, device: str):
    """Packed inputs and their padded [B, L] views (same memory)."""
    import torch

    B, L = map(int, size.split("x"))
    T = B * L
    g = torch.Generator().manual_seed(0)
    rewards = torch.zeros(T)  # [T]: sparse rewards on action tokens
    hits = torch.randint(0, T, (max(1, T // 50),), generator=g)
    rewards[hits] = torch.randn(hits.numel(), generator=g)
    values = torch.randn(T, generator=g)  # [T]
    block = torch.randint(0, 10, (T // 64 + 1,), generator=g) < 3  # 30% of 64-token blocks masked
    mask = ~block.repeat_interleave(64)[:T]  # [T] bool
    cu = torch.arange(B + 1, dtype=torch.int32) * L  # [B + 1]
    return [x.to(device) for x in (rewards, values, mask, cu)], (B, L)


def _require(impl: str, device: str) -> None:
    """Raise Unavailable unless our ``impl`` runs on ``device``."""
    import torch

    from lightning.kernels import KernelUnavailableError, _dispatch

    try:
        _dispatch.select("gae", torch.device(device), impl, ("cpp", "triton", "cuda"), "gae")
    except KernelUnavailableError as exc:
        raise Unavailable(str(exc)) from exc


def warm_up(provider: str, device: str) -> None:
    import torch

    from lightning import kernels

    impl = provider.split("+")[0]
    if impl in ("cpp", "triton", "cuda"):
        _require(impl, device)
    x = torch.ones(8, device=device)
    cu = torch.tensor([0, 8], device=device)
    if provider.startswith("cpp"):
        kernels.gae(x, x, None, cu, impl="cpp")
    elif provider.startswith("triton"):
        kernels.gae(x, x, None, cu, impl="triton")
        kernels.masked_whiten(x, impl="triton")
    elif provider == "cuda":
        kernels.gae(x, x, None, cu, impl="cuda")
    elif provider == "verl":
        _verl()


def make_fn(provider: str, size: str, device: str):
    from lightning import kernels
    from lightning.kernels.gae import reference

    (r, v, m, cu), (B, L) = _setup(size, device)
    if provider == "reference":
        return (lambda: reference.gae(r, v, m, cu, gamma=GAMMA, lam=LAM)), "pure torch, column loop"
    if provider in ("cpp", "triton", "cuda"):
        return (lambda: kernels.gae(r, v, m, cu, gamma=GAMMA, lam=LAM, impl=provider)), ""
    if provider in ("cpp+whiten", "triton+whiten"):
        impl = provider.split("+")[0]

        def fn():
            adv, ret = kernels.gae(r, v, m, cu, gamma=GAMMA, lam=LAM, impl=impl)
            return kernels.masked_whiten(adv, m, impl=impl), ret

        return fn, "gae + masked_whiten: the work verl's function does"
    if provider == "verl":
        core_algos = _verl()
        r2, v2, m2 = r.view(B, L), v.view(B, L), m.view(B, L).float()  # [B, L]
        return (lambda: core_algos.compute_gae_advantage_return(r2, v2, m2, GAMMA, LAM)), "verl 0.9 (includes whitening)"
    raise Unavailable(f"unknown provider {provider}")


def _bandwidth() -> float:
    """Device-to-device copy bandwidth, bytes/s (read + write)."""
    import torch

    from bench.harness import time_gpu

    x = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    return 2 * x.numel() / time_gpu(lambda: y.copy_(x))["median"]


def derived(bench: str, size: str, device: str, measured: dict) -> list[BenchResult]:
    rows = []
    verl = measured.get((size, "verl"))
    for p in providers(device):
        res = measured.get((size, p))
        if verl and res and p != "verl":
            rows.append(BenchResult(bench, p, size, "speedup_vs_verl", verl["median"] / res["median"], "x"))
    if device == "cuda":
        B, L = map(int, size.split("x"))
        bw_time = B * L * BYTES_PER_TOKEN / _bandwidth()
        rows.append(BenchResult(bench, "bw_bound", size, "time_median", bw_time, "s", "17 B/token at copy bandwidth"))
        for p in ("triton", "cuda"):
            if (size, p) in measured:
                rows.append(BenchResult(bench, p, size, "x_bw_bound", measured[(size, p)]["median"] / bw_time, "x", "target <= 2"))
    return rows


def main(argv: list[str] | None = None) -> list[BenchResult]:
    return run_sweep(sys.modules[__name__], "gae", argv)


if __name__ == "__main__":
    main()
