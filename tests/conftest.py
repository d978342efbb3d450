"""Fixtures shared by the integration tests."""

from __future__ import annotations

import pytest

from supervisor_helpers import kill_run


@pytest.fixture
def cleanup():
    """(dirs, procs): append run dirs and Popen objects; whatever is left of them is killed."""
    dirs: list = []
    procs: list = []
    yield dirs, procs
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()
    for d in dirs:
        kill_run(d)
