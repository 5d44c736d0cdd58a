"""The micro-batch loss and step metrics shared by the torch and DeepSpeed backends.

Both backends cut a :class:`~lightning.training.TrainBatch` into micro-batches of whole
sequences (``split_by_token_budget``), compute the action log-probs of each without the
``[T, V]`` logits (:func:`action_logprobs`), and scale each micro-batch's loss by its share
of the whole batch's aggregation units (:func:`agg_units`), so the summed gradients equal
those of one big batch. :func:`micro_batch_loss` is that per-micro-batch step (policy loss,
optional KL, detached stats); :func:`step_metrics` turns the accumulated stats into the
namespaced metrics both backends return. Only the framework around it (plain autograd +
AdamW, or a DeepSpeed engine) differs.

The config argument is duck-typed (:class:`LossSettings`): both backends' config structs
have these fields with the same names and meanings.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable
from typing import Any, ClassVar, Literal, Protocol, TypeVar

import msgspec
import structlog
import torch

from lightning._errors import ConfigError
from lightning.algorithms.aggregate import get_aggregator
from lightning.algorithms.cispo import cispo_loss
from lightning.algorithms.kl import kl_penalty_loss
from lightning.algorithms.ppo import ppo_clip_loss
from lightning.algorithms.tokens import from_padded, seq_ids, to_padded
from lightning.kernels.logprobs import processed_logprobs_from_hidden
from lightning.training.batch import TrainBatch, resolve_sampling

logger = structlog.get_logger()

__all__ = [
    "OPTIMIZER_IMPLS",
    "LossSettings",
    "StepSums",
    "TrainSettings",
    "action_logprobs",
    "agg_units",
    "as_settings",
    "check_batch",
    "check_optimizer_impl",
    "make_adamw",
    "micro_batch_loss",
    "policy_loss",
    "require_ref_logprobs",
    "scalar_sampling_problem",
    "step_metrics",
]


class TrainSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The optimizer and loss settings every backend's config shares (each backend's config
    struct extends it with its own fields)."""

    lr: float = 1e-6
    """AdamW learning rate."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW ``(beta1, beta2)``."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay, applied to every trainable parameter."""
    eps: float = 1e-8
    """AdamW epsilon."""
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm to this; ``None`` only measures it."""
    micro_batch_tokens: int = 8192
    """Token budget of one forward/backward on one rank (whole sequences; a longer sequence
    runs alone). Activation memory grows with it (SmolLM2-135M, fp32, CPU: about 1.5 GB per
    1024 tokens, so the default 8192 needs ~12 GB of activations; ``lightning train`` uses
    1024 on CPU). Lower it to save memory: the update is the same, only slower on a GPU
    (on CPU, measured, no slower)."""
    loss: Literal["ppo", "cispo"] = "ppo"
    """Policy loss: ``ppo`` (PPO-clip with dual clip) or ``cispo`` (clipped IS weight)."""
    loss_agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"] = "token-mean"
    """How per-token losses reduce to a scalar (see :mod:`lightning.algorithms.aggregate`)."""
    clip_ratio_low: float | None = None
    """Lower clip ``eps``; ``None`` = the loss's default (PPO 0.2, CISPO 1.0: no lower clip)."""
    clip_ratio_high: float = 0.2
    """Upper clip ``eps`` (ratio clipped at ``1 + clip_ratio_high``)."""
    clip_ratio_c: float | None = 3.0
    """PPO dual-clip bound for negative advantages (> 1); ``None`` disables it."""
    kl_coef: float = 0.0
    """Weight of the KL penalty to a frozen reference policy, the initial weights. The
    torch backend computes the reference log-probs itself (one no-grad forward per step;
    memory: one more copy of the weights, none with LoRA, whose reference is the model
    with the adapter disabled); ``batch.ref_logprobs``, when given, are used instead. The
    DeepSpeed and verl backends keep no reference: ``kl_coef > 0`` fails at their setup
    unless ``kl_reference = "batch"`` says every batch brings ``ref_logprobs``."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    """KL estimator (see :mod:`lightning.algorithms.kl`)."""
    temperature: float = 1.0
    """Temperature for tokens whose sampling temperature is unknown (counted as
    ``data/unknown_temperature_tokens``); every other token is scored at the temperature
    and top-k/top-p it was sampled with (see README "Sampling parameters")."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, ~30% more compute."""
    seed: int | None = None
    """Seed at setup (torch's RNG; verl's engine seed, where ``None`` means 0)."""

    def __post_init__(self) -> None:
        if self.micro_batch_tokens < 1:
            raise ValueError(f"micro_batch_tokens must be >= 1, got {self.micro_batch_tokens}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not self.lr >= 0:
            raise ValueError(f"lr must be >= 0, got {self.lr}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(
                f"max_grad_norm must be > 0 or None (no clipping), got {self.max_grad_norm}"
            )


class NoReferenceSettings(TrainSettings, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Settings of a backend that keeps no reference policy (DeepSpeed, verl)."""

    backend_name: ClassVar[str] = "this"

    kl_reference: Literal["batch"] | None = None
    """This backend keeps no reference policy. ``kl_coef > 0`` needs ``kl_reference =
    "batch"``: every batch then carries its own ``ref_logprobs`` (computed by your code and
    passed through the Python API; lightning's trainer never fills them), and a batch
    without them fails its step. Without it, ``kl_coef > 0`` fails at setup, before any
    rollout is spent (use the torch backend, which keeps the initial weights as the
    reference)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.kl_coef > 0 and self.kl_reference != "batch":
            raise ValueError(
                f"kl_coef={self.kl_coef} needs a reference policy, which the "
                f"{self.backend_name} backend does not keep: set kl_coef = 0, train with the "
                "torch backend (it keeps the initial weights as the reference), or set "
                'kl_reference = "batch" and give every batch its ref_logprobs'
            )


_S = TypeVar("_S", bound=TrainSettings)


def as_settings(config: Any, cls: type[_S], backend: str) -> _S:
    """``config`` as ``cls``: None gives the defaults, a dict (e.g. from TOML) is checked.

    Raises:
        ConfigError: (a ``ValueError``) an unknown field or a wrong type, named.
    """
    if config is None:
        return cls()
    if isinstance(config, cls):
        return config
    try:
        return msgspec.convert(config, type=cls)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"invalid {backend} backend config: {exc}") from exc


OptimizerImpl = Literal["auto", "fused", "foreach", "for-loop"]
OPTIMIZER_IMPLS: tuple[str, ...] = ("auto", "fused", "foreach", "for-loop")
_FOREACH_DEVICES = ("cuda", "xpu")  # torch's own foreach default; on CPU its foreach is a loop


def check_optimizer_impl(value: str) -> None:
    """Raise ``ValueError`` naming the field unless ``value`` is one of :data:`OPTIMIZER_IMPLS`."""
    if value not in OPTIMIZER_IMPLS:
        raise ValueError(
            f"optimizer_impl must be one of {', '.join(map(repr, OPTIMIZER_IMPLS))}, got "
            f"{value!r} ('auto' picks the fastest the parameters' device supports)"
        )


def make_adamw(
    params: Iterable[torch.Tensor], cfg: TrainSettings, impl: str, *, backend: str
) -> tuple[torch.optim.AdamW, str]:
    """``torch.optim.AdamW`` over ``params`` with ``cfg``'s hyperparameters and the update
    kernel ``impl``; returns ``(optimizer, the kernel chosen)``. Logged once (``backend.optimizer``).

    The kernels compute the same update (equal up to fp32 rounding): ``fused`` (one kernel
    per parameter group: CPU, CUDA, MPS...; floating-point parameters), ``foreach`` (batched
    ops over all tensors; a real speed-up only on CUDA/XPU) or ``for-loop`` (one op sequence
    per tensor: torch's own default on CPU, 4-5x slower than fused there). ``auto`` takes
    ``fused`` where torch supports it for these parameters, else ``foreach`` on CUDA/XPU,
    else ``for-loop``. Each optimizer re-asserts its kernel when a checkpoint's state is
    loaded (torch would otherwise take the saved groups' flags), so a checkpoint written
    with one kernel resumes with the configured one.

    Raises:
        ValueError: ``impl`` is unknown, or ``fused`` was asked for and torch cannot run it
            on these parameters (the message says why and what to set instead).
    """
    check_optimizer_impl(impl)
    params = list(params)
    hyper = {"lr": cfg.lr, "betas": cfg.betas, "eps": cfg.eps, "weight_decay": cfg.weight_decay}
    devices = sorted({p.device.type for p in params})
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in params})
    fused_error = None
    chosen = impl
    if impl in ("auto", "fused"):
        fused_error = _fused_problem(params)
        if fused_error is None:
            chosen = "fused"
        elif impl == "fused":
            raise ValueError(
                f"optimizer_impl='fused' cannot run on these parameters (devices {devices}, "
                f"dtypes {dtypes}): {fused_error}; set optimizer_impl to 'auto' or 'foreach'"
            )
        else:
            chosen = "foreach" if set(devices) <= set(_FOREACH_DEVICES) else "for-loop"
    opt = torch.optim.AdamW(params, **hyper, fused=chosen == "fused", foreach=chosen == "foreach")
    opt.register_load_state_dict_pre_hook(_keep_own_kernel)
    logger.info(
        "backend.optimizer",
        backend=backend,
        optimizer="AdamW",
        impl=chosen,
        requested=impl,
        devices=devices,
        dtypes=dtypes,
        **({"fused_unavailable": fused_error} if fused_error else {}),
    )
    return opt, chosen


def _fused_problem(params: list[torch.Tensor]) -> str | None:
    """None when torch's fused AdamW runs for every (device, dtype) of ``params``, else why
    not. Probed with one step on a one-element tensor of each: torch checks support only at
    the first step, and which dtypes a device's kernel takes differs by device and version."""
    for device, dtype in sorted({(p.device, p.dtype) for p in params}, key=str):
        probe = torch.zeros(1, device=device, dtype=dtype, requires_grad=True)  # [1]
        probe.grad = torch.zeros_like(probe)  # [1]
        try:
            torch.optim.AdamW([probe], fused=True).step()
        except (RuntimeError, NotImplementedError) as exc:
            return f"{type(exc).__name__}: {exc}"
    return None


def _keep_own_kernel(opt: torch.optim.Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
    """``load_state_dict`` pre-hook: the loaded groups keep this optimizer's kernel flags
    (torch copies every saved group key, ``fused``/``foreach`` included, over the live ones)."""
    groups = [
        {**saved, "fused": own.get("fused"), "foreach": own.get("foreach")}
        for saved, own in zip(state_dict["param_groups"], opt.param_groups)
    ]
    return {**state_dict, "param_groups": groups}


class LossSettings(Protocol):
    """The loss fields a backend config carries (see ``TorchBackendConfig`` for meanings)."""

    loss: str
    loss_agg: str
    clip_ratio_low: float | None
    clip_ratio_high: float
    clip_ratio_c: float | None
    kl_coef: float
    kl_estimator: str
    temperature: float
    logprob_impl: str | None


@dataclasses.dataclass
class StepSums:
    """Per-step sums of micro-batch stats, each already weighted by its micro-batch's share
    (``w`` for losses, ``tok_w`` = share of action tokens for the rest). ``gaps`` keeps
    this rank's per-token ``|trainer - sampler|`` for the p99 (not all-reduced)."""

    policy: float = 0.0
    kl: float = 0.0
    clip_frac: float = 0.0
    approx_kl: float = 0.0
    gap: float = 0.0
    ratio_mean: float = 0.0
    clip_low: float = 0.0
    clip_high: float = 0.0
    entropy: float = 0.0
    gaps: list[torch.Tensor] = dataclasses.field(default_factory=list)

    _SUMMED = (
        "policy",
        "kl",
        "clip_frac",
        "approx_kl",
        "gap",
        "ratio_mean",
        "clip_low",
        "clip_high",
        "entropy",
    )

    def to_tensor(self) -> torch.Tensor:
        """float64 ``[9]`` of the summed stats (for an all-reduce across ranks)."""
        return torch.tensor([getattr(self, f) for f in self._SUMMED], dtype=torch.float64)  # [9]

    @classmethod
    def from_tensor(cls, t: torch.Tensor, gaps: list[torch.Tensor] | None = None) -> StepSums:
        return cls(**dict(zip(cls._SUMMED, (float(x) for x in t.tolist()))), gaps=gaps or [])

    def gap_p99(self) -> float:
        if not self.gaps:
            return 0.0
        g = torch.cat(self.gaps).float()  # [N]
        return float(torch.quantile(g, 0.99)) if g.numel() else 0.0


def agg_units(batch: TrainBatch, loss_agg: str) -> float:
    """Aggregation units of ``batch``: action tokens (``token-mean``), or sequences with at
    least one action (the ``seq-mean-*`` modes)."""
    if loss_agg == "token-mean":
        return float(batch.action_mask.sum())
    counts = torch.zeros(batch.num_sequences, device=batch.action_mask.device)  # [B]
    counts = counts.index_add(0, seq_ids(batch.cu_seqlens), batch.action_mask.float())  # [B]
    return float((counts > 0).sum())


def action_logprobs(
    decoder: Any,
    weight: torch.Tensor,
    mb: TrainBatch,
    *,
    temperature: float,
    impl: str | None,
    return_entropy: bool = False,
) -> Any:
    """Log-probs of ``mb``'s action tokens, float32 ``[T_mb]`` (0 off actions); differentiable
    when grad is enabled. With ``return_entropy``: ``(logprobs, entropy)``, both ``[T_mb]``.

    ``mb`` is right-padded to ``[b, L]`` with an attention mask and its own ``position_ids``
    (attention never crosses sequences) and run through ``decoder`` (the model without its
    LM head); the log-probs come from the hidden state one position before each action and
    the output-embedding ``weight`` ``[V, H]``, chunked over the vocabulary. Each token is
    scored under the processing that sampled it (its temperature, top-k, top-p;
    :func:`~lightning.training.batch.resolve_sampling` with ``temperature`` for unknown
    ones), the distribution whose log-probs the engines return.
    """
    cu = mb.cu_seqlens  # [b + 1]
    ids = to_padded(mb.input_ids, cu, pad=0)  # [b, L]
    pos = to_padded(mb.position_ids, cu, pad=0)  # [b, L]
    attn = to_padded(torch.ones_like(mb.input_ids), cu, pad=0)  # [b, L]
    out = decoder(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False)
    hidden_padded = out.last_hidden_state  # [b, L, H]
    hidden = from_padded(hidden_padded, cu)  # [T_mb, H]
    act = mb.action_mask.nonzero().squeeze(-1)  # [N]: action positions (never a sequence start)
    temps, top_k, top_p, _ = resolve_sampling(mb, temperature)  # [T_mb] each
    out = processed_logprobs_from_hidden(
        hidden[act - 1],  # [N, H]: the hidden state one position before each action
        weight,  # [V, H]
        mb.input_ids[act],  # [N]
        temperature=temps[act],  # [N]
        top_k=top_k[act],  # [N]
        top_p=top_p[act],  # [N]
        return_entropy=return_entropy,
        impl=impl,
    )  # [N] fp32
    full = torch.zeros(mb.num_tokens, dtype=torch.float32, device=out.logprobs.device)  # [T_mb]
    lp = full.index_put((act,), out.logprobs)  # [T_mb]
    if not return_entropy:
        return lp
    return lp, full.index_put((act,), out.entropy.detach())  # [T_mb], [T_mb]


def policy_loss(lp: torch.Tensor, mb: TrainBatch, cfg: LossSettings) -> tuple[torch.Tensor, Any]:
    """``cfg.loss`` (PPO-clip or CISPO) of ``mb``'s action tokens: ``([], stats)``."""
    agg = get_aggregator(cfg.loss_agg)
    if cfg.loss == "cispo":
        return cispo_loss(
            lp,
            mb.old_logprobs,
            mb.advantages,
            mb.action_mask,
            mb.cu_seqlens,
            clip_ratio_low=1.0 if cfg.clip_ratio_low is None else cfg.clip_ratio_low,
            clip_ratio_high=cfg.clip_ratio_high,
            is_weights=mb.is_weights,
            agg=agg,
        )  # [], CISPOStats
    return ppo_clip_loss(
        lp,
        mb.old_logprobs,
        mb.advantages,
        mb.action_mask,
        mb.cu_seqlens,
        clip_ratio_low=0.2 if cfg.clip_ratio_low is None else cfg.clip_ratio_low,
        clip_ratio_high=cfg.clip_ratio_high,
        clip_ratio_c=cfg.clip_ratio_c,
        is_weights=mb.is_weights,
        agg=agg,
    )  # [], PPOStats


def micro_batch_loss(
    lp: torch.Tensor,
    mb: TrainBatch,
    cfg: LossSettings,
    *,
    w: float,
    tok_w: float,
    use_kl: bool,
    sums: StepSums,
    entropy: torch.Tensor | None = None,
) -> torch.Tensor:
    """The loss to back-propagate for one micro-batch, ``[]``: (policy loss + ``kl_coef`` *
    KL) * ``w``, where ``w`` is the micro-batch's share of the batch's aggregation units.
    Adds the micro-batch's detached stats to ``sums`` (``tok_w``: its share of the batch's
    action tokens). ``lp`` is :func:`action_logprobs` of ``mb`` ``[T_mb]``, ``entropy``
    its per-token entropy (for the metric) or None."""
    loss, stats = policy_loss(lp, mb, cfg)  # [], stats
    total = loss  # []
    if use_kl:
        assert mb.ref_logprobs is not None
        kl, _ = kl_penalty_loss(
            lp,
            mb.ref_logprobs,
            mb.action_mask,
            mb.cu_seqlens,
            estimator=cfg.kl_estimator,
            agg=get_aggregator(cfg.loss_agg),
        )  # [], KLStats
        total = total + cfg.kl_coef * kl  # []
        sums.kl += float(kl.detach()) * w
    _add_token_stats(lp, mb, cfg, tok_w, sums, entropy)
    sums.policy += float(loss.detach()) * w
    sums.clip_frac += float(stats.clip_frac) * tok_w
    sums.approx_kl += float(stats.approx_kl) * tok_w
    return total * w  # []


def _add_token_stats(
    lp: torch.Tensor,
    mb: TrainBatch,
    cfg: LossSettings,
    tok_w: float,
    sums: StepSums,
    entropy: torch.Tensor | None,
) -> None:
    """Trainer-vs-sampler gap (mean, and the tokens for the p99), ratio mean, the fractions
    of tokens whose ratio the clip holds at the low (``A < 0``) and high (``A > 0``) bound,
    and the entropy, over ``mb``'s action tokens."""
    with torch.no_grad():
        m = mb.action_mask  # [T_mb]
        n = m.sum().clamp(min=1)  # []
        gap = (lp.detach() - mb.old_logprobs).abs()  # [T_mb]
        ratio = torch.exp(torch.clamp(lp.detach() - mb.old_logprobs, -20.0, 20.0))  # [T_mb]
        low = 0.2 if cfg.clip_ratio_low is None else cfg.clip_ratio_low
        if cfg.loss == "cispo" and cfg.clip_ratio_low is None:
            low = 1.0
        adv = mb.advantages  # [T_mb]
        clip_low = m & (adv < 0) & (ratio < 1.0 - low)  # [T_mb]
        clip_high = m & (adv > 0) & (ratio > 1.0 + cfg.clip_ratio_high)  # [T_mb]
        sums.gap += float((gap * m).sum() / n) * tok_w
        sums.ratio_mean += float((ratio * m).sum() / n) * tok_w
        sums.clip_low += float(clip_low.sum() / n) * tok_w
        sums.clip_high += float(clip_high.sum() / n) * tok_w
        if entropy is not None:
            sums.entropy += float((entropy * m).sum() / n) * tok_w
        sums.gaps.append(gap[m].float().cpu())


def check_batch(batch: TrainBatch, temperature: float) -> dict[str, float]:
    """Refuse a batch a step cannot train on honestly; return its data counts
    (``data/unknown_temperature_tokens``, ``data/greedy_tokens``).

    Raises:
        ValueError: an action token's old log-prob is NaN (its sampler log-prob was
            missing or untrusted and nobody recomputed it: the Trainer does that before
            the step, see ``BatcherConfig.missing_logprobs``).
    """
    bad = torch.isnan(batch.old_logprobs) & batch.action_mask  # [T]
    if bool(bad.any()):
        raise ValueError(
            f"{int(bad.sum())} action tokens have no usable old log-prob (NaN: the sampler's "
            "were missing or not of the processed distribution): recompute them first "
            "(lightning.training.Trainer does with missing_logprobs='recompute') or drop "
            "those sequences (missing_logprobs='drop')"
        )
    return resolve_sampling(batch, temperature)[3]


def scalar_sampling_problem(batch: TrainBatch, temperature: float) -> str | None:
    """Why ``batch`` cannot be scored at the one ``temperature`` without truncation that
    a backend with a scalar-temperature scorer (verl's actor) offers, or None."""
    t, k, p, _ = resolve_sampling(batch, temperature)  # [T] each
    act = batch.action_mask  # [T]
    off = act & ((t - temperature).abs() > 1e-6)  # [T]
    cut = act & ((k > 0) | (p < 1.0))  # [T]
    if not bool(off.any() | cut.any()):
        return None
    seen = sorted({round(float(v), 4) for v in t[act].unique()})
    return (
        f"{int(off.sum())} action tokens were sampled at another temperature than the "
        f"configured {temperature} (seen: {seen}) and {int(cut.sum())} with top-k/top-p; "
        "verl's actor scores one temperature over the full vocabulary. Sample at "
        f"temperature={temperature} with top_p=1 and top_k=0, set the backend's "
        "temperature to the agent's, or train with the torch or deepspeed backend, which "
        "score each token under its own sampling"
    )


def require_ref_logprobs(batch: TrainBatch, kl_coef: float, backend: str) -> None:
    """For backends that keep no reference policy: ``kl_coef > 0`` needs the batch's own
    ``ref_logprobs``. Raises ``ValueError`` with the fix (never a silently skipped KL)."""
    if kl_coef > 0 and batch.ref_logprobs is None:
        raise ValueError(
            f"kl_coef={kl_coef} but the {backend} backend keeps no reference policy and this "
            "batch has no ref_logprobs: set kl_coef = 0, supply batch.ref_logprobs, or train "
            "with the torch backend (it keeps the initial weights as the reference)"
        )


def step_metrics(
    sums: StepSums,
    *,
    kl_coef: float,
    grad_norm: float,
    lr: float,
    skipped: bool,
    tokens: int,
    action_tokens: float,
    micro_batches: int,
    t0: float,
    step: int,
) -> dict[str, float]:
    """The namespaced metrics of one step (keys documented on ``TorchBackend.train_step``);
    ``t0`` is the step's ``time.perf_counter()`` start."""
    return {
        "loss/policy": sums.policy,
        "loss/kl": sums.kl,
        "loss/total": sums.policy + kl_coef * sums.kl,
        "actor/grad_norm": grad_norm,
        "actor/clip_frac": sums.clip_frac,
        "actor/approx_kl": sums.approx_kl,
        "actor/logprob_gap": sums.gap,
        "actor/logprob_gap_p99": sums.gap_p99(),
        "actor/ratio_mean": sums.ratio_mean,
        "actor/clip_frac_low": sums.clip_low,
        "actor/clip_frac_high": sums.clip_high,
        "actor/entropy": sums.entropy,
        "actor/lr": lr,
        "actor/skipped": float(skipped),
        "perf/tokens": float(tokens),
        "perf/action_tokens": action_tokens,
        "perf/micro_batches": float(micro_batches),
        "perf/step_s": time.perf_counter() - t0,
        "train/step": float(step),
    }
