"""When a stop signal is a new one, and when the same one told twice.

Ctrl-C sends SIGINT to the whole process group: under the supervisor
(``[worker] processes = N``) each child gets it from the terminal, and a
SIGTERM from the supervisor, which passes every stop signal on. A second
signal means "stop now, leave shipping to the next start", so a child that
counted both would skip the shipping grace it promised. A stop signal that
comes within :data:`REPEAT` seconds (monotonic clock) of the last one
counted is that same stop, told twice; a later one is a second stop.
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
