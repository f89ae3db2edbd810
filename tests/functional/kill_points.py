"""Killing the worker at its system calls from outside, with strace.

``strace -f -e inject=SYSCALLS:signal=KILL:when=K`` kills at the K-th call
of one thread; a first run under ``strace -f -o TRACE`` counts how far K
goes (:func:`most_calls_per_thread`). Used by test_crash_points.py and
test_worker_stream.py.
"""

import collections
import re

#: The system calls a worker is killed at, by kind, as strace names them
#: (``-e trace=`` and ``-e inject=``).
KINDS = {
    "rename": "rename,renameat,renameat2",
    "unlink": "unlink,unlinkat",
    "fsync": "fsync,fdatasync",
}

_SYSCALL = re.compile(r"^(\d+)\s+(\w+)\(")


def most_calls_per_thread(trace, kinds=KINDS):
    """``{kind: the most calls of that kind one thread made}`` in an
    ``strace -f -o TRACE`` file: strace's ``when=K`` counts per thread, so
    K runs up to this."""
    calls = collections.Counter()
    with open(trace) as lines:
        for line in lines:
            match = _SYSCALL.match(line)
            if match:
                for kind, names in kinds.items():
                    if match.group(2) in names.split(","):
                        calls[kind, match.group(1)] += 1
    return {kind: max([n for (k, _), n in calls.items() if k == kind] or
                      [0]) for kind in kinds}
