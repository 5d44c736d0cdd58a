"""Test doubles: run a daemon and runtimes in one process without sockets.

    hub = MemoryHub()
    daemon = Daemon(DaemonConfig(data_dir=tmp), transport=hub)
    async with lightning.session(transport=hub.connect(), spill_dir=tmp2): ...
"""

from ._daemon import Daemon, TrajectoryBuffer, recover
from ._ingest import Trajectory
from ._transport.memory import MemoryClientTransport, MemoryHub

__all__ = ["Daemon", "MemoryClientTransport", "MemoryHub", "Trajectory", "TrajectoryBuffer", "recover"]
