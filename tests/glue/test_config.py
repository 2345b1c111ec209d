"""mpc-glue's flags: a flag wins over its environment variable, which wins over the
default; values from either are converted alike; a bad value names where it came from."""
from __future__ import annotations

import pytest

from mpc.glue import config


def test_flags_win_over_the_environment_which_wins_over_defaults():
    env = {"MPC_GLUE_WORKERS": "7", "MPC_GLUE_GC_INTERVAL": "5s", "POD_NAMESPACE": "from-pod",
           "MPC_GLUE_RETENTION": "2h", "MPC_GLUE_LEADER_ELECT": "true"}
    cfg = config.parse(["--retention", "90s"], env)
    assert (cfg.retention, cfg.workers, cfg.gc_interval) == (90.0, 7, 5.0)
    assert cfg.namespace == "from-pod" and cfg.leader_elect is True
    assert config.parse([], {"POD_NAMESPACE": "p", "MPC_GLUE_NAMESPACE": "n"}).namespace == "n"
    default = config.parse([], {})
    assert (default.retention, default.workers, default.leader_elect) == (3600.0, 4, False)
    assert default.watch_namespaces == []
    assert config.parse(["--watch-namespace", "a", "--watch-namespace", "b"],
                        {}).watch_namespaces == ["a", "b"]
    assert config.parse([], {"MPC_GLUE_WATCH_NAMESPACES": "a,,b"}).watch_namespaces == ["a", "b"]


def test_a_bad_value_is_refused_naming_its_source(capsys):
    with pytest.raises(SystemExit, match="MPC_GLUE_CANCEL_GRACE='soon'"):
        config.parse([], {"MPC_GLUE_CANCEL_GRACE": "soon"})
    with pytest.raises(SystemExit):
        config.parse(["--cancel-grace", "soon"], {})
    assert "not a duration: 'soon'" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--workers must be at least 1"):
        config.parse(["--workers", "0"], {})


def test_leader_timings_the_election_accepts():
    config.parse(["--leader-elect", "--retry-period", "1s", "--renew-deadline", "2s",
                  "--lease-duration", "3s"], {})
    for bad in (["--retry-period", "0.5s"], ["--renew-deadline", "2s"],
                ["--lease-duration", "7s"]):
        with pytest.raises(SystemExit, match="renew-deadline"):
            config.parse(["--leader-elect", *bad], {})
