"""When a stop signal is a new one, and when the same one told twice.

A second stop signal means "stop now, leave shipping to the next start".
But one stop is often told twice: Ctrl-C pressed twice, or systemd's
SIGTERM and then ``pkill``'s. A stop signal that comes within
:data:`REPEAT` seconds (monotonic clock) of the last one counted is that
same stop, told twice; a later one is a second stop. (Under the supervisor,
``[worker] processes = N``, the children ignore SIGINT, which the terminal
sends the whole process group: the supervisor counts it and passes it on
as one SIGTERM.)
"""

import time

__all__ = ["REPEAT", "StopSignals"]

#: A stop signal this many seconds or less after the one counted last is
#: the same stop told again.
REPEAT = 1.0


class StopSignals:
    """Counts stop signals, the repeats of one stop counted once.

    :param clock: monotonic seconds (injected by tests).
    """

    def __init__(self, clock=time.monotonic):
        self._clock = clock
        self._counted_at = None
        #: Stop signals counted so far.
        self.count = 0

    def received(self):
        """Count a signal that just came, unless it repeats the last one.

        :returns: True when it counted (a new stop), False for a repeat.
        """
        now = self._clock()
        if self._counted_at is not None and \
                now - self._counted_at < REPEAT:
            return False
        self._counted_at = now
        self.count += 1
        return True
