"""Fixtures of the shipping tests."""

import pytest

from shoebox_worker import callbacks
from shoebox_worker.ship import shipper


@pytest.fixture
def make_shipper():
    made = []

    def make(steps, retry_initial=0.01, retry_max=0.05, stats=None,
             start=True, **kwargs):
        ship = shipper.Shipper(callbacks.CallbackChain(steps), retry_initial,
                               retry_max, stats=stats, **kwargs)
        if start:
            ship.start()
        made.append(ship)
        return ship
    yield make
    for ship in made:
        ship.stop(5)
        with ship._cond:  # what the process exit would release
            jobs = list(ship._jobs.values())
        for job in jobs:
            job.lock.release()
