"""mpc's image inputs are cached per key, and two runs wanting the same one make it once."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

MAKE_WHEELHOUSE = "from mpc.generator import images; print(images.wheelhouse())"


def test_two_runs_wanting_one_wheelhouse_make_it_once(tmp_path):
    # Two `mpc images` runs on one cache at the same time (two test workers releasing
    # at once, `make run` beside `make test`): the second waits for the first and reuses
    # its wheelhouse instead of building the same one beside it.
    env = dict(os.environ, MPC_CACHE=str(tmp_path / "cache"))
    procs = [subprocess.Popen([sys.executable, "-c", MAKE_WHEELHOUSE], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for _ in range(2)]
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, out + err
    made = [out.strip().splitlines()[-1] for out, _ in outs]
    assert made[0] == made[1], made
    builds = sum(out.count("building the wheelhouse") for out, _ in outs)
    assert builds == 1, f"the wheelhouse was built {builds} times: {outs}"
    wheels = sorted(p.name for p in Path(made[0]).iterdir())
    assert any(w.startswith("mpc-") for w in wheels), wheels
    assert any(w.startswith("pip-") for w in wheels), wheels
