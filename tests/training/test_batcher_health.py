"""The batcher warns, with counts, when online training traffic only fails (no runner stops it)."""

from structlog.testing import capture_logs

from lightning.training.batcher import FAILURE_WARN_S, Batcher, BatcherConfig

from test_batcher import Clock, traj


def test_only_failures_is_said_once_per_interval_with_counts():
    clock = Clock()
    b = Batcher(BatcherConfig(group_size=2), clock=clock)
    with capture_logs() as logs:
        for k in range(30):  # 30 failures within the first interval: nothing said yet
            clock.t = k
            b.add(traj(0.0, status="failed", group=f"g{k}"))
        assert not [x for x in logs if x["event"] == "batcher.only_failures"]
        clock.t = FAILURE_WARN_S + 1
        b.add(traj(0.0, status="failed", group="late"))
        warned = [x for x in logs if x["event"] == "batcher.only_failures"]
        assert len(warned) == 1 and warned[0]["failed"] == 31 and warned[0]["completed"] == 0
        # the next interval has a success: nothing said
        b.add(traj(1.0, group="ok"))
        clock.t = 2 * FAILURE_WARN_S + 2
        b.add(traj(0.0, status="failed", group="late2"))
        assert len([x for x in logs if x["event"] == "batcher.only_failures"]) == 1
    assert b.counters["only_failures_warnings"] == 1


def test_only_uniform_groups_is_said_once_per_interval_with_outcomes():
    """A task the policy always solves (or never) trains on nothing: said, with counts."""
    clock = Clock()
    b = Batcher(BatcherConfig(group_size=2), clock=clock)
    with capture_logs() as logs:
        for k in range(10):  # ten groups, each with one outcome for both members
            clock.t = k
            b.add(traj(1.0, group=f"g{k}"))
            b.add(traj(1.0, group=f"g{k}"))
        assert not [x for x in logs if x["event"] == "batcher.only_uniform_groups"]
        clock.t = FAILURE_WARN_S + 1
        b.add(traj(0.0, group="late"))
        b.add(traj(0.0, group="late"))
        warned = [x for x in logs if x["event"] == "batcher.only_uniform_groups"]
        assert len(warned) == 1 and warned[0]["groups"] == 10
        assert warned[0]["outcomes"] == [1.0]
        # the next interval has a group with signal: nothing said
        b.add(traj(0.0, group="mixed"))
        b.add(traj(1.0, group="mixed"))
        clock.t = 2 * FAILURE_WARN_S + 2
        b.add(traj(1.0, group="late2"))
        b.add(traj(1.0, group="late2"))
        assert len([x for x in logs if x["event"] == "batcher.only_uniform_groups"]) == 1
    assert b.counters["only_uniform_warnings"] == 1
    assert b.counters["set_aside.uniform_groups"] == 12
