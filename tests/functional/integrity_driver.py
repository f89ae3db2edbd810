"""The digest chain driven the way the shipper drives it, for
test_integrity_crash_points.py (run as a script, killed by strace).

``python integrity_driver.py PHASE WORK KEY CONTAINER STORED PROGRESS``
with ``ST_AUTH``, ``ST_USER`` and ``ST_KEY`` in the environment (and,
to spare a login at every run, the storage URL and token in
``SHOEBOX_TEST_STORAGE_URL`` and ``SHOEBOX_TEST_AUTH_TOKEN``). The
archives are in the container already (the test put them there, with
their ``X-Object-Meta-Sha256``, as the ``swift`` step leaves them), and
the JSON file ``STORED`` says, for each, the
:class:`~shoebox_worker.contract.Stored` the ``swift`` step returns
(``path``, ``name``, ``size``, ``sha256``, ``etag``), so that a run makes
no request but the chain's own: the digests, put with the ``swift`` step's
``put_digest``.

- ``first``: open the chain of the working directory ``WORK``, then, for
  each archive of :data:`FIRST`: record it, and note it in ``PROGRESS``
  (the shipper's state file moving on: appended, not fsynced, as a
  SIGKILL loses no written byte), ticking between archives; then close
  (the final digest).
- ``again``: what a restart does: open, ship (record, note) every archive
  of :data:`FIRST` that ``PROGRESS`` does not name (the one a crash cut
  short, maybe between its recording and its state file: recorded again
  with the same Stored, as the step, run again, finds the object stored
  and returns the same), then go on with :data:`SECOND`, ticking between
  archives, and close.
- ``open``: open only (the recovery of what a crash left), then exit.

``python integrity_driver.py serve`` (:func:`serve`) runs them without
paying for an interpreter and its imports at every run: it reads one
command per line on stdin, forks a child for it, and says its pid; the
child waits for ``go``, and, when it is to be traced, until strace
(attached with ``-p PID``) intercepts its calls (:data:`TRACED_PPID`),
then runs; the server says its exit code (negative: killed by that
signal).

The clock the chain measures ``digest_interval`` with jumps 1000 s at
every reading, so every tick with archives pending makes a digest: the
same calls in the same order at every run of a phase, which is what
counting the calls and then killing at the K-th of them needs.
"""

import itertools
import json
import os
import sys
import time
import traceback

from shoebox_worker import contract
from shoebox_worker.integrity import chain as chain_mod
from shoebox_worker.ship import swift

#: Archives the first run ships, then the ones a restart goes on with
#: (one worker run: ``_<run>-<sequence>``, so that a lost one is a gap).
RUN = "0123456789ab"
FIRST = ["integrity_%s-%d.events" % (RUN, n) for n in (1, 2)]
SECOND = ["integrity_%s-3.events" % RUN]
#: ``[integrity] digest_interval`` (the clock jumps further at each read).
INTERVAL = 1
#: What ``getppid()`` returns once strace, attached to a child of
#: :func:`serve`, intercepts its system calls (``-e
#: inject=getppid:retval=...``): no pid is that large.
TRACED_PPID = 99999999


def _shipped(progress):
    try:
        with open(progress) as f:
            return set(f.read().split())
    except FileNotFoundError:
        return set()


def _ship(chain, stored, name, progress):
    item = stored[name]
    chain.record(contract.Stored(item["path"], name=item["name"],
                                 size=item["size"], sha256=item["sha256"],
                                 etag=item["etag"]), None, item["path"])
    fd = os.open(progress, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (name + "\n").encode())
    finally:
        os.close(fd)


def main(phase, work, key, container, stored, progress):
    with open(stored) as f:
        stored = json.load(f)
    step = swift.SwiftUploadCallback(
        auth=os.environ["ST_AUTH"], user=os.environ["ST_USER"],
        key=os.environ["ST_KEY"], container=container, retries="1",
        timeout="30",
        os_storage_url=os.environ.get("SHOEBOX_TEST_STORAGE_URL", ""),
        os_auth_token=os.environ.get("SHOEBOX_TEST_AUTH_TOKEN", ""))
    clock = itertools.count(0, 1000)
    chain = chain_mod.Chain(directory=work, signing_key=key, store=step,
                            interval=INTERVAL, host="crash-test",
                            monotonic=lambda: next(clock))
    try:
        chain.open()
        if phase == "open":
            return 0
        if phase == "first":
            todo = FIRST
        else:
            done = _shipped(progress)
            todo = [name for name in FIRST if name not in done] + SECOND
        for n, name in enumerate(todo):
            if n:
                chain.tick()  # between archives, as the shipper does
            _ship(chain, stored, name, progress)
        chain.close()
    finally:
        step.close()
    return 0


def serve():
    """Run the commands read on stdin, each in a child of its own.

    A command is a JSON object: ``args`` (for :func:`main`), ``log`` (the
    child's output goes there) and ``traced`` (the child waits until
    ``getppid()`` says :data:`TRACED_PPID` before it runs). The server
    answers the child's pid, waits for a line (``go``) and answers its
    exit code once it is gone.
    """
    for line in sys.stdin:
        command = json.loads(line)
        ready, go = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child
            os.close(go)
            log = os.open(command["log"], os.O_WRONLY | os.O_APPEND
                          | os.O_CREAT, 0o644)
            os.dup2(log, 1)
            os.dup2(log, 2)
            code = 1
            if not os.read(ready, 1):
                os._exit(code)  # the server is gone: no go
            try:
                while command["traced"] and os.getppid() != TRACED_PPID:
                    time.sleep(0.001)  # strace does not intercept yet
                code = main(*command["args"])
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        os.close(ready)
        print(pid, flush=True)
        if not sys.stdin.readline():  # the test is gone
            os.close(go)
            os.waitpid(pid, 0)
            break
        os.write(go, b"g")
        os.close(go)
        _, status = os.waitpid(pid, 0)
        print(os.waitstatus_to_exitcode(status), flush=True)
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == ["serve"]:
        sys.exit(serve())
    sys.exit(main(*sys.argv[1:]))
