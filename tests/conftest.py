from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from tests.jobs import JobsAhead, run_later


@pytest.fixture(autouse=True)
def _one_thread():
    """Intra-op threads only slow the tests' small models down on a 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # the modules whose tests read jobs run ahead go last: the other tests run while the jobs do
    items.sort(key=lambda item: hasattr(getattr(item, "module", None), "JOBS"))


@pytest.fixture(scope="session", autouse=True)
def _jobs_ahead(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[JobsAhead]:
    """Every selected test's job (its module's ``JOBS``), started ahead in the order the tests run."""
    ahead = JobsAhead()
    for item in request.session.items:
        runs = getattr(getattr(item, "module", None), "JOBS", {})
        if item.originalname in runs:
            ahead.submit(item.nodeid, run_later(runs[item.originalname], tmp_path_factory, item))
    yield ahead
    ahead.close()


@pytest.fixture(autouse=True)
def _cores(request: pytest.FixtureRequest, _jobs_ahead: JobsAhead) -> None:
    """The cores this test keeps busy, which the jobs running ahead leave it: none while it waits for its job."""
    marker = request.node.get_closest_marker("cores")
    _jobs_ahead.foreground(0 if "jobs" in request.fixturenames else marker.args[0] if marker else 1)


@pytest.fixture
def jobs(_jobs_ahead: JobsAhead) -> JobsAhead:
    """The jobs run ahead; a test reads its own with ``tests.jobs.result_of(jobs, request)``."""
    return _jobs_ahead
