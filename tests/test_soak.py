"""A short soak (benchmarks/soak.py): over 1,500 steps on 3 stages, memory, in-flight batches and pending sends
stay flat. Slow, so out of the default run: ``python -m pytest -m slow``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.jobs import run_job


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_short_soak_stays_flat(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    result = run_job("benchmarks/soak.py", "--steps", "1500", "--out", str(out), timeout=540)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    processes = json.loads(out.read_text())["processes"]
    assert len(processes) == 3
    for process in processes:
        assert process["growth_mb"] < 5.0
        assert process["max_in_flight"] <= process["delay"] + 1
        assert process["max_pending_sends"] <= 12  # two channels, three messages of a header and one tensor each
