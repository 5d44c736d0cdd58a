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
        "CURVE keys for non-loopback binds.",
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
    g.add_argument("--http-host", default="127.0.0.1")
    g.add_argument("--http-port", type=int, default=8000, help="0 picks a free port")
    g.add_argument("--api-key", default=os.environ.get("LIGHTNING_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default $LIGHTNING_API_KEY); "
                   "mandatory for a non-loopback --http-host")
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
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
    args = _serve_parser().parse_args(argv)
    try:
        config = DaemonConfig(
            bind=args.bind,
            backend=args.backend,
            data_dir=args.data_dir,
            max_frame_bytes=args.max_frame_bytes,
            buffer_size=args.buffer_size,
            fsync=args.fsync,
            heartbeat_s=args.heartbeat_s,
            curve_secret_key_file=args.curve_secret_key,
            curve_authorized_keys=args.curve_authorized_keys,
            log_level=args.log_level,
            stats_interval_s=args.stats_interval_s,
        )
        from ._transport.zmq import check_bind

        check_bind(config.bind, config.curve_secret_key_file, config.curve_authorized_keys)
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


def _is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _load_policy(args: argparse.Namespace):
    """Load the checkpoint and tokenizer (blocking: runs in a worker thread)."""
    from pathlib import Path

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.model == "default":
        from .models import default_model_path

        path = default_model_path()
    else:
        path = Path(args.model)
        if not (path / "config.json").exists():
            raise ConfigError(
                f"--model {args.model!r} is not a Hugging Face checkpoint directory (no "
                "config.json); pass a local directory ('default' serves SmolLM2-135M-Instruct)"
            )
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, local_files_only=True)
    return path, model.to(device).eval(), tok


async def _serve_policy(tg, daemon, args: argparse.Namespace) -> str:
    import anyio

    from .engine.torch_engine import TorchEngine
    from .serving import PolicyServer

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
    )
    return await tg.start(server.serve)


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
            base_url = await _serve_policy(tg, daemon, args)
            if args.print_address:
                print(base_url, flush=True)
        if args.ingest_only:
            tg.start_soon(_drain, daemon)
        else:
            logger.warning(
                "daemon.training_unavailable",
                backend=config.backend,
                reason="training backends are not part of this release yet: trajectories "
                "are stored and kept buffered; run with --ingest-only to mark them used",
            )
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
