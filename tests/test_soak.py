"""A short soak (benchmarks/soak.py): over 1,500 steps on 3 stages, memory, in-flight batches and pending sends
stay flat. Slow, so out of the default run: ``python -m pytest -m slow``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_LAUNCH_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "NODE_RANK", "GLOBAL_RANK", "RANK", "WORLD_SIZE")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_short_soak_stays_flat(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARIABLES and not k.startswith("PL_")}
    command = [sys.executable, "benchmarks/soak.py", "--steps", "1500", "--out", str(out)]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=540)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    processes = json.loads(out.read_text())["processes"]
    assert len(processes) == 3
    for process in processes:
        assert process["growth_mb"] < 5.0
        assert process["max_in_flight"] <= process["delay"] + 1
        assert process["max_pending_sends"] <= 12  # two channels, three messages of a header and one tensor each
