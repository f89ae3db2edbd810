"""How the suite is spread over pytest-xdist's workers.

``scripts/test`` runs every test with pytest-xdist (``-n``, ``--dist
loadgroup``; pytest.ini sets both): most functional tests spend their time
waiting on a broker, a roll, a token or a process, so they overlap. Each
test names its own queues, exchanges, vhosts, containers and working
directories (the ``names`` fixture, ``tmp_path``), and no test stops a
server another test may be using.

Tests that must not overlap share an ``xdist_group``: one worker runs
them, one after the other.

- ``cluster-node-3``: the tests that kill node 3 of the project's own
  three-node cluster (the ``cluster`` fixture) or stop its application:
  the leader-kill tests of test_rabbit_cluster (they place the queue's
  leader on node 3) and the node restart of test_worker_failures. Two at
  once would take two of the three nodes down, and a quorum queue or a
  stream stops serving without a majority. The other cluster tests (TLS)
  use nodes 1 and 2 only, and run beside them.

Tests marked ``slow``, and the tests of a group (one worker runs them
one after the other: the cluster-node-3 ones take about 4 minutes in
all), run first, so that the longest ones do not start last and stretch
the run's tail. A group is the run's longest path, so its tests run at
the priority the run started with: ``scripts/test`` runs pytest under
``nice -n 5`` (the servers first), and a group's test, and the processes
it starts, go back to nice 0 where the run may (as root). Under 8 jobs
on 2 cores a leader-kill test took 150 s at nice 5, 22 s alone.

Compiled modules are cached even where ``PYTHONDONTWRITEBYTECODE`` is
set (this machine kind sets it): without the cache every xdist worker,
and every worker or tool process a test starts, compiles the package and
rewrites the test modules' asserts again (about 3 s of CPU per worker,
a fifth of the unit tests' time). The cache goes to ``__pycache__``
folders, which git ignores; a changed source file is compiled again.
"""

import os
import sys

import pytest

sys.dont_write_bytecode = False  # the test modules are imported after this
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)  # processes tests start


@pytest.hookimpl(wrapper=True)
def pytest_collection_modifyitems(config, items):
    """The order first, before xdist's own hook; then, on a worker, check
    that the groups took: xdist marks a grouped test by a suffix of its
    node id, which pytest 9.2 ignores (pytest-xdist issue 1386), and the
    tests of a group would then run beside each other, silently."""
    # stable: the order within each part stays as collected
    items.sort(key=lambda item: item.get_closest_marker("slow") is None
               and item.get_closest_marker("xdist_group") is None)
    yield
    if not getattr(config.option, "loadgroup", False):
        return
    lost = [item.nodeid for item in items
            if item.get_closest_marker("xdist_group") is not None
            and "@" not in item.nodeid]
    if lost:
        raise pytest.UsageError(
            "pytest-xdist's --dist loadgroup did not group %d test(s) (e.g. "
            "%s): this pytest ignores xdist's group suffix (pytest 9.2: "
            "pytest-xdist issue 1386); install the versions setup.cfg's "
            "test extras ask for" % (len(lost), lost[0]))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """A grouped test (and the threads and processes it starts) at nice
    0, then back (see the module's docstring)."""
    if item.get_closest_marker("xdist_group") is None:
        return (yield)
    before = os.getpriority(os.PRIO_PROCESS, 0)
    try:
        os.setpriority(os.PRIO_PROCESS, 0, min(before, 0))
    except OSError:  # not root: the test runs as it is
        return (yield)
    try:
        return (yield)
    finally:
        os.setpriority(os.PRIO_PROCESS, 0, before)
