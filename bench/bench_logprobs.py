"""Log-prob batching: naive log_softmax + gather vs the chunked kernels, fwd and fwd+bwd.

    python -m bench.bench_logprobs [--quick] [--device cpu|cuda]

Sizes are N tokens x V vocabulary (V = 151,936, Qwen2/2.5's) with hidden size H = 896;
fp32 on CPU, bf16 on CUDA; temperature 1. Providers are ``<impl>/<mode>``:

- impl ``reference``: the spec, which is the naive baseline: ``logits = hidden @ weight.T``
  (fp32), ``log_softmax`` + ``gather``, autograd backward. ``cpp`` / ``triton``:
  ``logprobs_from_hidden`` (chunked; never [N, V] in fp32).
- impl ``*_logits``: from given logits (a leaf allocated before the measurement):
  ``reference_logits`` (naive), ``verl_logits`` (verl's ``logprobs_from_logits``; on CPU
  its plain log_softmax + gather path), ``cpp_logits`` / ``triton_logits`` (ours).
- mode ``fwd``: forward under ``no_grad`` (old-policy / reference-model log-probs);
  ``train``: forward + backward with a random upstream gradient.

Rows: time, ``peak_mem`` (extra memory of one call over its inputs), ``peak_mem_net``
(train only: minus the gradients the call must return, [V, H] + [N, H] fp32 from hidden
or [N, V] from logits), ``mem_vs_naive`` (net peak / the naive provider's net peak of the
same family and mode; target <= 0.25), ``speedup_vs_naive``, and ``max_abs_err``:
largest |logprob - naive fp32 logprob| on the same inputs.
"""

from __future__ import annotations

import sys
import warnings

from bench.harness import BenchResult, Unavailable, run_sweep

V, H = 151_936, 896
CPU_SIZES, CPU_QUICK = [f"256x{V}", f"1024x{V}"], [f"256x{V}"]
GPU_SIZES, GPU_QUICK = [f"1024x{V}", f"4096x{V}", f"16384x{V}"], [f"4096x{V}"]
SIZES, QUICK_SIZES = CPU_SIZES, CPU_QUICK


def providers(device: str) -> list[str]:
    ours = "cpp" if device == "cpu" else "triton"
    impls = ["reference", ours, "reference_logits", "verl_logits", f"{ours}_logits"]
    return [f"{i}/{m}" for m in ("fwd", "train") for i in impls]


def repeat_for(provider: str, size: str) -> int:
    return 3


def _verl_F():
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from verl.utils import torch_functional
    except ImportError as exc:
        raise Unavailable(f"verl not importable: {exc}") from exc
    return torch_functional


def _dtype(device: str):
    import torch

    return torch.float32 if device == "cpu" else torch.bfloat16


def _setup(size: str, device: str):
    import torch

    N, Vs = map(int, size.split("x"))
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, H, generator=g).to(device, _dtype(device))  # [N, H]
    weight = (torch.randn(Vs, H, generator=g) / H**0.5 * 4).to(device, _dtype(device))  # [V, H]
    ids = torch.randint(0, Vs, (N,), generator=g).to(device)  # [N]
    g_lp = torch.randn(N, generator=g).to(device)  # [N]
    return hidden, weight, ids, g_lp


def _require(impl: str, device: str) -> None:
    """Raise Unavailable unless our ``impl`` runs on ``device``."""
    import torch

    from lightning.kernels import KernelUnavailableError, _dispatch

    try:
        _dispatch.select("logprobs", torch.device(device), impl, ("cpp", "triton"), "logprobs_hidden_fwd")
    except KernelUnavailableError as exc:
        raise Unavailable(str(exc)) from exc


def warm_up(provider: str, device: str) -> None:
    import torch

    from lightning import kernels

    impl = provider.split("/")[0].split("_")[0]
    if impl == "verl":
        _verl_F()
    elif impl != "reference":
        _require(impl, device)
        h = torch.randn(4, 8, device=device, requires_grad=True)
        w = torch.randn(16, 8, device=device, requires_grad=True)
        ids = torch.zeros(4, dtype=torch.int64, device=device)
        kernels.logprobs_from_hidden(h, w, ids, impl=impl).logprobs.sum().backward()
        kernels.logprobs_from_logits(h @ w.T, ids, impl=impl).logprobs.sum().backward()


def _forward(impl: str, hidden, weight, ids, logits):
    """Logprobs [N] fp32 from ``impl`` (building the autograd graph when grads are on)."""
    from lightning import kernels
    from lightning.kernels.logprobs import reference

    base, _, src = impl.partition("_")
    if base == "reference":
        if src == "logits":
            return reference.logprobs_from_logits(logits, ids).logprobs
        return reference.logprobs_from_hidden(hidden, weight, ids).logprobs
    if base == "verl":
        return _verl_F().logprobs_from_logits(logits, ids).float()
    if src == "logits":
        return kernels.logprobs_from_logits(logits, ids, impl=base).logprobs
    return kernels.logprobs_from_hidden(hidden, weight, ids, impl=base).logprobs


def make_fn(provider: str, size: str, device: str):
    import torch

    impl, mode = provider.split("/")
    hidden, weight, ids, g_lp = _setup(size, device)
    logits = None
    if impl.endswith("_logits"):
        with torch.no_grad():
            logits = hidden @ weight.T  # [N, V] input dtype, a leaf
        hidden = weight = None
    leaves = [t for t in (hidden, weight, logits) if t is not None]
    if mode == "fwd":

        def fn():
            with torch.no_grad():
                return _forward(impl, hidden, weight, ids, logits)  # [N]

        return fn, "forward, no_grad"
    for t in leaves:
        t.requires_grad_(True)

    def fn():
        for t in leaves:
            t.grad = None
        lp = _forward(impl, hidden, weight, ids, logits)  # [N]
        lp.backward(g_lp)
        return lp.detach()

    return fn, "forward + backward"


def error_vs_reference(provider: str, size: str, device: str) -> float:
    """max |logprob - naive fp32 logprob| on the benchmark's inputs."""
    import torch

    from lightning.kernels.logprobs import reference

    impl = provider.split("/")[0]
    hidden, weight, ids, _ = _setup(size, device)
    with torch.no_grad():
        exp = reference.logprobs_from_hidden(hidden, weight, ids).logprobs  # [N]
        logits = hidden @ weight.T if impl.endswith("_logits") else None  # [N, V]
        got = _forward(impl, hidden, weight, ids, logits)  # [N]
    return float((got - exp).abs().max())


def _grad_bytes(provider: str, size: str, device: str) -> int:
    """Bytes of the gradients a train call must return (not the kernel's choice)."""
    impl, mode = provider.split("/")
    if mode != "train":
        return 0
    N, Vs = map(int, size.split("x"))
    item = 4 if device == "cpu" else 2
    if impl.endswith("_logits"):
        return N * Vs * item
    return (Vs * H + N * H) * item


def derived(bench: str, size: str, device: str, measured: dict) -> list[BenchResult]:
    rows = []
    for p in providers(device):
        res = measured.get((size, p))
        if res is None:
            continue
        impl, mode = p.split("/")
        net = res["peak"] - _grad_bytes(p, size, device)
        if mode == "train":
            rows.append(BenchResult(bench, p, size, "peak_mem_net", net / 2**20, "MiB", "peak minus returned gradients"))
        if "err" in res:
            rows.append(BenchResult(bench, p, size, "max_abs_err", res["err"], "nats", "vs naive fp32 from hidden"))
        naive_p = ("reference_logits" if impl.endswith("_logits") else "reference") + "/" + mode
        naive = measured.get((size, naive_p))
        if naive and not impl.startswith("reference"):
            naive_net = naive["peak"] - _grad_bytes(naive_p, size, device)
            rows.append(BenchResult(bench, p, size, "mem_vs_naive", net / max(naive_net, 1), "x", f"net peak / {naive_p}'s; target <= 0.25"))
            rows.append(BenchResult(bench, p, size, "speedup_vs_naive", naive["median"] / res["median"], "x"))
    return rows


def main(argv: list[str] | None = None) -> list[BenchResult]:
    import torch

    global SIZES, QUICK_SIZES
    args = sys.argv[1:] if argv is None else argv
    on_gpu = "cuda" in args or ("cpu" not in args and torch.cuda.is_available())
    SIZES, QUICK_SIZES = (GPU_SIZES, GPU_QUICK) if on_gpu else (CPU_SIZES, CPU_QUICK)
    return run_sweep(sys.modules[__name__], "logprobs", argv)


if __name__ == "__main__":
    main()
