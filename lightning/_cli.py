"""``lightning-daemon``: the trainer daemon's command line."""

from __future__ import annotations

import argparse
import ipaddress
import os
import signal
import sys
from collections.abc import Sequence

from ._config import DaemonConfig
from ._errors import ConfigError

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup  # anyio's dependency on Python 3.10

BACKENDS = ("torch", "verl", "deepspeed")


def _serve_parser() -> argparse.ArgumentParser:
    d = DaemonConfig()
    p = argparse.ArgumentParser(
        prog="lightning-daemon",
        description="Receive rollouts from lightning runtimes, store them durably and "
        "train the policy on them. Subcommands: `lightning-daemon keygen DIR` creates "
        "CURVE keys for non-loopback binds; `lightning-daemon inspect DATA_DIR` lists what "
        "was stored (rollouts, transitions, rewards, merges, used by training or not).",
    )
    p.add_argument("--bind", default=d.bind, help=f"ZeroMQ address to listen on (default {d.bind}); "
                   "tcp://HOST:0 picks a free port; non-loopback needs CURVE keys")
    p.add_argument("--backend", default=d.backend, choices=BACKENDS,
                   help="training backend (default torch)")
    p.add_argument("--data-dir", default=d.data_dir,
                   help=f"write-ahead log and cursor directory (default ./{d.data_dir})")
    p.add_argument("--max-frame-bytes", type=int, default=d.max_frame_bytes,
                   help="refuse larger frames with a nack")
    p.add_argument("--buffer-size", type=int, default=d.buffer_size,
                   help="completed trajectories waiting for the trainer before clients wait")
    p.add_argument("--fsync", choices=("never", "always"), default=d.fsync,
                   help="'always' fsyncs before each ack (survives power loss, slower)")
    p.add_argument("--heartbeat-s", type=float, default=d.heartbeat_s)
    p.add_argument("--wal-compact-bytes", type=int, default=d.wal_compact_bytes,
                   help="compact the write-ahead log when it grew this much since the last "
                   "compaction (checked at each commit; 0: never)")
    p.add_argument("--rollout-ttl-s", type=float, default=d.rollout_ttl_s,
                   help="a rollout open this long without its end is ended as failed "
                   "('expired', counted; the --on-failure policy applies); 0: never")
    p.add_argument("--client-ttl-s", type=float, default=d.client_ttl_s,
                   help="retire a client id that never said Goodbye after this long idle "
                   "(not connected, no open rollouts; counted); 0: never (default 24 h)")
    p.add_argument("--curve-secret-key", default="", metavar="FILE",
                   help="the daemon's NAME.key_secret (from `lightning-daemon keygen`)")
    p.add_argument("--curve-authorized-keys", default="", metavar="DIR",
                   help="directory of client public keys allowed to connect")
    p.add_argument("--log-level", default=d.log_level,
                   choices=("debug", "info", "warning", "error"))
    p.add_argument("--stats-interval-s", type=float, default=d.stats_interval_s)
    p.add_argument("--ingest-only", action="store_true",
                   help="store and acknowledge trajectories without training (marks them "
                   "used as they complete)")
    p.add_argument("--print-address", action="store_true",
                   help="print the ZeroMQ address (and then the HTTP base URL, when serving) "
                   "on stdout once listening")
    g = p.add_argument_group("policy server (OpenAI-compatible HTTP)")
    g.add_argument("--model", default="default", metavar="PATH",
                   help="Hugging Face checkpoint directory to serve and train; 'default' is "
                   "the embedded SmolLM2-135M-Instruct; 'none' serves no model")
    g.add_argument("--served-model-name", default=None,
                   help="model name clients send (default: the checkpoint directory name)")
    g.add_argument("--model-alias", action="append", default=[], metavar="NAME",
                   help="extra model names accepted (repeatable), e.g. gpt-4o-mini")
    g.add_argument("--accept-any-model", action="store_true",
                   help="serve the policy whatever model name a request gives")
    g.add_argument("--rollout-start-wait-s", type=float, default=5.0, metavar="S",
                   help="how long a request naming a rollout the daemon does not know yet "
                   "waits for its start to arrive from the app's runtime before a 404")
    g.add_argument("--max-stored-responses", type=int, default=10_000, metavar="N",
                   help="Responses API turns kept for previous_response_id (LRU)")
    g.add_argument("--max-stored-response-bytes", type=int, default=256 << 20, metavar="B",
                   help="bytes of stored Responses API turns (LRU)")
    g.add_argument("--stored-response-ttl-s", type=float, default=3600.0, metavar="S",
                   help="a stored response expires this long after its last use")
    g.add_argument("--http-host", default="127.0.0.1")
    g.add_argument("--http-port", type=int, default=8000, help="0 picks a free port")
    g.add_argument("--api-key", default=os.environ.get("LIGHTNING_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default $LIGHTNING_API_KEY); "
                   "mandatory for a non-loopback --http-host")
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--no-otlp", action="store_true",
                   help="do not accept OTLP/HTTP traces at POST /v1/traces")
    g.add_argument("--otlp-port", type=int, default=None,
                   help="with --model none: serve POST /v1/traces alone on this port")
    g.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    g.add_argument("--engine", default="torch", choices=("torch", "vllm"),
                   help="inference engine: torch (default, CPU or GPU) or vllm "
                   "(pip install 'lightning-rl[vllm]'; weights updated in place, landing "
                   "check after each update)")
    t = p.add_argument_group("training (see lightning.training.batcher for the semantics)")
    t.add_argument("--backend-config", default=None, metavar="TOML",
                   help="backend settings file (torch: TorchBackendConfig fields, e.g. lr)")
    t.add_argument("--group-size", type=int, default=8,
                   help="finished rollouts that complete a group (default 8)")
    t.add_argument("--group-timeout-s", type=float, default=300.0,
                   help="use a group with what it has after this long (default 300)")
    t.add_argument("--batch-size", type=int, default=32,
                   help="trajectories per optimizer step (default 32)")
    t.add_argument("--max-batch-tokens", type=int, default=None)
    t.add_argument("--estimator", default="grpo",
                   help="grpo, grpo_no_std, rloo, reinforce_pp, or verl:<name> (verl's "
                   "estimator by name, verl installed)")
    t.add_argument("--credit", default="returns_to_go",
                   choices=("final", "discounted", "returns_to_go"))
    t.add_argument("--gamma", type=float, default=1.0)
    t.add_argument("--on-failure", default="drop", choices=("drop", "zero"),
                   help="failed rollouts: drop them or train on them with reward 0")
    t.add_argument("--max-staleness", type=int, default=2,
                   help="policy versions a sample may lag before --stale-policy applies")
    t.add_argument("--stale-policy", default="drop", choices=("drop", "is"),
                   help="stale samples: drop, or truncated importance weights")
    t.add_argument("--air", action="store_true",
                   help="Automatic Intermediate Rewarding with the built-in rules")
    t.add_argument("--max-steps", type=int, default=None, help="stop training after N steps")
    t.add_argument("--save-every", type=int, default=10,
                   help="checkpoint every N steps into DATA_DIR/checkpoints (0: never)")
    t.add_argument("--no-resume", action="store_true",
                   help="ignore existing checkpoints in DATA_DIR/checkpoints")
    return p


def _keygen(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="lightning-daemon keygen",
                                description="Create CURVE key pairs: DIR/daemon.key(_secret) "
                                "and DIR/client.key(_secret).")
    p.add_argument("directory")
    p.add_argument("--names", nargs="+", default=["daemon", "client"])
    args = p.parse_args(argv)
    from ._transport.zmq import keygen

    for name in args.names:
        public, secret = keygen(args.directory, name)
        print(f"{name}: public {public}  secret {secret}")
    return 0


def daemon_main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["keygen"]:
        return _keygen(argv[1:])
    if argv[:1] == ["inspect"]:
        from ._inspect import inspect_main

        return inspect_main(argv[1:])
    # the `deepspeed` launcher appends --local_rank=N; LOCAL_RANK in the environment says it too
    argv = [a for a in argv if not a.startswith(("--local_rank", "--local-rank"))]
    args = _serve_parser().parse_args(argv)
    if _is_worker_rank():
        return _worker_main(args)
    try:
        config = DaemonConfig(
            bind=args.bind,
            backend=args.backend,
            data_dir=args.data_dir,
            max_frame_bytes=args.max_frame_bytes,
            buffer_size=args.buffer_size,
            fsync=args.fsync,
            heartbeat_s=args.heartbeat_s,
            wal_compact_bytes=args.wal_compact_bytes,
            rollout_ttl_s=args.rollout_ttl_s,
            client_ttl_s=args.client_ttl_s,
            curve_secret_key_file=args.curve_secret_key,
            curve_authorized_keys=args.curve_authorized_keys,
            log_level=args.log_level,
            stats_interval_s=args.stats_interval_s,
        )
        from ._transport.zmq import check_bind

        check_bind(config.bind, config.curve_secret_key_file, config.curve_authorized_keys)
        for flag in ("rollout_start_wait_s", "max_stored_responses",
                     "max_stored_response_bytes", "stored_response_ttl_s"):
            value = getattr(args, flag)
            if not value >= 0 or value == float("inf"):
                raise ConfigError(f"--{flag.replace('_', '-')} must be a finite number >= 0, "
                                  f"got {value}")
        if args.model != "none" and not args.api_key and not _is_loopback_host(args.http_host):
            raise ConfigError(
                f"refusing to serve HTTP on {args.http_host!r} without --api-key: it is "
                "reachable from other machines"
            )
    except ConfigError as exc:
        print(f"lightning-daemon: error: {exc}", file=sys.stderr)
        return 2
    from ._logging import configure_logging

    configure_logging(config.log_level)
    import anyio

    try:
        anyio.run(_run, config, args, backend="asyncio")
    except BaseExceptionGroup as group:
        config_errors, rest = group.split(ConfigError)
        if rest is not None or config_errors is None:
            raise
        for exc in config_errors.exceptions:
            print(f"lightning-daemon: error: {exc}", file=sys.stderr)
        return 2
    except ConfigError as exc:
        print(f"lightning-daemon: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _is_worker_rank() -> bool:
    """A non-zero rank of a multi-process launch (torchrun / deepspeed): it only trains."""
    try:
        return int(os.environ.get("RANK", "0")) != 0 and int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def _model_path(args: argparse.Namespace):
    from pathlib import Path

    if args.model == "default":
        from .models import default_model_path

        return default_model_path()
    path = Path(args.model)
    if not (path / "config.json").exists():
        raise ConfigError(
            f"--model {args.model!r} is not a Hugging Face checkpoint directory (no "
            "config.json); pass a local directory ('default' serves SmolLM2-135M-Instruct)"
        )
    return path


def _worker_main(args: argparse.Namespace) -> int:
    """Ranks other than 0: set the backend up, then follow rank 0 until it closes.

    Rank 0 runs the daemon (the one ingest point and the one HTTP endpoint); the backend
    carries the commands (see ``lightning_backends._deepspeed``).
    """
    from ._config import load_toml_dict
    from ._logging import configure_logging

    try:
        if args.model == "none" or args.ingest_only:
            raise ConfigError("worker ranks need a --model to train (and no --ingest-only)")
        from lightning_backends import get_backend

        try:
            cls = get_backend(args.backend)
        except LookupError as exc:
            raise ConfigError(str(exc)) from exc
        backend = cls()
        if not hasattr(backend, "serve_worker"):
            raise ConfigError(
                f"backend {args.backend!r} runs in one process: launch lightning-daemon once "
                "(RANK/WORLD_SIZE say this is a multi-process launch)"
            )
        config = load_toml_dict(args.backend_config) if args.backend_config else None
        model_path = _model_path(args)
        configure_logging(args.log_level)
        # a launcher signals every rank at once: leave quietly (rank 0 ends the run)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        backend.setup(str(model_path), config)
    except (ConfigError, ValueError, TypeError) as exc:
        print(f"lightning-daemon: error: {exc}", file=sys.stderr)
        return 2
    backend.serve_worker()
    return 0


def _is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _load_policy(args: argparse.Namespace):
    """Load the checkpoint and tokenizer (blocking: runs in a worker thread)."""

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = _model_path(args)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, local_files_only=True)
    return path, model.to(device).eval(), tok


async def _start_training(tg, daemon, engine, model_path, config: DaemonConfig,
                          args: argparse.Namespace) -> None:
    from pathlib import Path

    from ._config import load_toml_dict
    from .training.batcher import BatcherConfig
    from .training.service import load_backend, start_trainer
    from .training.trainer import TrainerConfig

    try:
        batcher_config = BatcherConfig(
            group_size=args.group_size, group_timeout_s=args.group_timeout_s,
            batch_size=args.batch_size, max_batch_tokens=args.max_batch_tokens,
            estimator=args.estimator, credit=args.credit, gamma=args.gamma,
            on_failure=args.on_failure, max_staleness=args.max_staleness,
            stale_policy=args.stale_policy,
        )
        trainer_config = TrainerConfig(max_steps=args.max_steps, save_every=args.save_every)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    backend_config = load_toml_dict(args.backend_config) if args.backend_config else None
    backend = await load_backend(config.backend, model_path, backend_config)
    if hasattr(backend, "close"):  # multi-process backends release their workers
        tg.start_soon(_close_on_exit, backend)
    await start_trainer(
        tg, daemon, backend, engine,
        batcher_config=batcher_config, trainer_config=trainer_config, air=args.air,
        checkpoint_dir=Path(config.data_dir) / "checkpoints", resume=not args.no_resume,
    )


async def _close_on_exit(backend) -> None:
    import anyio

    import structlog

    try:
        await anyio.sleep_forever()
    finally:
        with anyio.CancelScope(shield=True):
            try:
                await anyio.to_thread.run_sync(backend.close)
            except Exception as exc:  # noqa: BLE001 - shutting down: say it, do not mask
                # torchrun/deepspeed signal every rank at once: the workers may be gone
                structlog.get_logger().warning(
                    "backend.close_failed", error=f"{type(exc).__name__}: {exc}",
                    hint="worker ranks exited first (a launcher signalled them too)",
                )


async def _serve_policy(tg, daemon, args: argparse.Namespace):
    """Load the model, start the engine and the HTTP server: ``(base_url, engine, path)``."""
    import anyio

    from .engine.torch_engine import TorchEngine
    from .otel import TraceReceiver
    from .serving import PolicyServer

    if args.engine == "vllm":
        from .engine.vllm_engine import create_vllm_engine

        from .engine.base import EngineError

        path = _model_path(args)
        try:
            import torch

            cpu = args.device == "cpu" or not torch.cuda.is_available()
            engine = create_vllm_engine(path, max_model_len=args.max_model_len,
                                        dtype="float32" if cpu else "auto")
        except (LookupError, EngineError) as exc:  # not installed, or an untested version
            raise ConfigError(str(exc)) from exc
    else:
        path, model, tok = await anyio.to_thread.run_sync(_load_policy, args)
        engine = TorchEngine(model, tok, max_model_len=args.max_model_len)
    await tg.start(engine.serve)
    server = PolicyServer(
        engine,
        model_name=args.served_model_name or path.name,
        host=args.http_host,
        port=args.http_port,
        api_key=args.api_key,
        aliases=tuple(args.model_alias),
        accept_any_model=args.accept_any_model,
        capture=daemon.capture,
        traces=None if args.no_otlp else TraceReceiver(daemon, api_key=args.api_key),
        otlp=not args.no_otlp,
        # a restarted daemon is not ready (GET /ready: 503) before its checkpoint is loaded
        hold_ready=not args.ingest_only,
        rollout_start_wait_s=args.rollout_start_wait_s,
        max_stored_responses=args.max_stored_responses,
        max_stored_response_bytes=args.max_stored_response_bytes,
        stored_response_ttl_s=args.stored_response_ttl_s,
    )
    return await tg.start(server.serve), engine, path, server


async def _run(config: DaemonConfig, args: argparse.Namespace) -> None:
    import anyio
    import structlog

    from ._daemon import Daemon

    logger = structlog.get_logger()
    daemon = Daemon(config)
    async with anyio.create_task_group() as tg:
        address = await tg.start(daemon.serve)
        if args.print_address:
            print(address, flush=True)
        if args.model != "none":
            base_url, engine, model_path, server = await _serve_policy(tg, daemon, args)
            if args.print_address:
                print(base_url, flush=True)
        elif args.otlp_port is not None and not args.no_otlp:
            import functools

            from .otel import TraceReceiver

            receiver = TraceReceiver(daemon, api_key=args.api_key)
            url = await tg.start(functools.partial(
                receiver.serve, host=args.http_host, port=args.otlp_port))
            if args.print_address:
                print(url, flush=True)
        if args.ingest_only:
            tg.start_soon(_drain, daemon)
        elif args.model == "none":
            logger.warning(
                "daemon.training_unavailable",
                backend=config.backend,
                reason="--model none: there is no policy to train; trajectories are stored "
                "and kept buffered (run with --ingest-only to mark them used)",
            )
        else:
            await _start_training(tg, daemon, engine, model_path, config, args)
            server.ready = True  # the checkpoint (if any) is loaded and its weights served
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                logger.info("daemon.signal", signal=signal.Signals(signum).name)
                tg.cancel_scope.cancel()
                return


async def _drain(daemon) -> None:
    import anyio

    buffer = daemon.buffer
    while True:
        last = (await buffer.get()).index
        while True:  # take what is there, then persist the commit point once
            try:
                last = buffer.get_nowait().index
            except anyio.WouldBlock:
                break
        buffer.commit(last)


if __name__ == "__main__":
    sys.exit(daemon_main())
