"""Test doubles: run a daemon and runtimes in one process without sockets.

    hub = MemoryHub()
    daemon = Daemon(DaemonConfig(data_dir=tmp), transport=hub)
    async with lightning.session(transport=hub.connect(), spill_dir=tmp2): ...
"""

from ._daemon import Daemon, TrajectoryBuffer, recover
from ._ingest import Trajectory
from ._transport.memory import MemoryClientTransport, MemoryHub

__all__ = [
    "Daemon", "MemoryClientTransport", "MemoryHub", "ScriptedStack", "Trajectory",
    "TrajectoryBuffer", "recover",
]


class ScriptedStack:
    """A live daemon, :class:`~lightning.engine.scripted.ScriptedEngine` and policy server
    on loopback, run in a thread of their own: the production path for tests of agents.

    ::

        with ScriptedStack(script, tmp_path) as stack:
            lightning.init(daemon=stack.address, policy_url=stack.base_url,
                           policy_model=stack.model_name, spill_dir=str(tmp_path / "spill"))
            ...run the agent (sync, or anyio.run(...) of an async one)...
            traj = stack.trajectory(rollout_id)   # waits until the daemon holds it, finished
            lightning.shutdown()

    The agent's calls go over real HTTP to the real :class:`~lightning.serving.PolicyServer`
    and its rollouts over ZeroMQ to a real daemon; only the model is a script. ``model``:
    a causal LM for the engine's log-probs (default: none, synthetic log-probs); the
    tokenizer defaults to the tiny model's (SmolLM2's tokenizer and chat template).
    """

    def __init__(self, script, data_dir, *, tokenizer=None, model=None, model_name="scripted",
                 max_model_len=4096):
        from pathlib import Path

        self.script = script
        self.data_dir = Path(data_dir)
        self.model_name = model_name
        self._tokenizer = tokenizer
        self._model = model
        self._max_model_len = max_model_len
        self._portal_cm = None
        self.portal = None
        self.engine = None
        self.daemon = None
        self.server = None
        self.address = ""
        self.base_url = ""

    def __enter__(self):
        from anyio.from_thread import start_blocking_portal

        if self._tokenizer is None:
            from transformers import AutoTokenizer

            from .models import tiny_model_path

            self._tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_path()),
                                                            local_files_only=True)
        self._portal_cm = start_blocking_portal()
        self.portal = self._portal_cm.__enter__()
        self._stopped = None
        try:
            self._future, (self.address, self.base_url) = self.portal.start_task(self._run)
        except BaseException:
            self._portal_cm.__exit__(None, None, None)
            raise
        return self

    async def _run(self, *, task_status):
        import anyio

        from ._config import DaemonConfig
        from .engine.scripted import ScriptedEngine
        from .serving import PolicyServer

        self.daemon = Daemon(DaemonConfig(bind="tcp://127.0.0.1:0", data_dir=str(self.data_dir),
                                          stats_interval_s=0))
        self.engine = ScriptedEngine(self._tokenizer, self.script, model=self._model,
                                     max_model_len=self._max_model_len)
        self.server = PolicyServer(self.engine, model_name=self.model_name, port=0,
                                   capture=self.daemon.capture, accept_any_model=True)
        self._stopped = anyio.Event()
        async with anyio.create_task_group() as tg:
            address = await tg.start(self.daemon.serve)
            await tg.start(self.engine.serve)
            base_url = await tg.start(self.server.serve)
            task_status.started((address, base_url))
            await self._stopped.wait()
            await self.engine.aclose()
            tg.cancel_scope.cancel()

    def trajectory(self, rollout_id, timeout=30.0):
        """The rollout's trajectory once the daemon holds it finished (waits up to
        ``timeout`` s; ``TimeoutError`` names the rollout)."""

        async def wait():
            import anyio

            with anyio.move_on_after(timeout):
                while True:
                    found = self.daemon.capture.find(rollout_id)
                    if found is not None and found[0].status != "open":
                        return found[0]
                    await anyio.sleep(0.02)
            raise TimeoutError(f"rollout {rollout_id} was not finished in the daemon "
                               f"within {timeout} s")

        return self.portal.call(wait)

    def __exit__(self, *exc):
        try:
            self.portal.call(self._stopped.set)
            self._future.result(timeout=60)
        finally:
            self._portal_cm.__exit__(*exc)
        return False
