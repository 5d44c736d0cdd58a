"""The policy-server flags of lightning-daemon: a bad value is exit 2 naming the flag,
checked before anything starts (hypothesis over values)."""

import math

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lightning._cli import daemon_main

FLAGS = ["--rollout-start-wait-s", "--max-stored-responses", "--max-stored-response-bytes",
         "--stored-response-ttl-s"]
INT_FLAGS = {"--max-stored-responses", "--max-stored-response-bytes"}


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flag=st.sampled_from(FLAGS),
       value=st.one_of(st.floats(max_value=-1e-9), st.just(math.nan), st.just(math.inf),
                       st.integers(max_value=-1)))
def test_bad_values_are_refused_with_the_flags_name(flag, value, capsys):
    if flag in INT_FLAGS and isinstance(value, float):
        value = int(value) if math.isfinite(value) and value <= -1 else -1
    rc = daemon_main([f"{flag}={value}", "--model", "none", "--data-dir", "/nonexistent/x"])
    assert rc == 2
    err = capsys.readouterr().err
    assert f"{flag} must be a finite number >= 0" in err, err
