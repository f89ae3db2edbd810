"""scripts/debian-packages: what ./scripts/test installs from Debian.

Its decision is checked with --dry-run and a PATH that hides binaries
(nothing is installed or removed here); its refusal when not root, with
a non-root user (runuser, when the tests run as root).
"""

import os
import pathlib
import re
import shutil
import socket
import subprocess
import sys

import pytest

SCRIPT = str(pathlib.Path(__file__).resolve().parents[2]
             / "scripts" / "debian-packages")


def _answers(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        return True
    except OSError:
        return False


def _servers_missing():
    """The server packages the script must list under a PATH that hides
    them: only those whose server does not answer."""
    missing = []
    if not os.path.exists("/usr/lib/rabbitmq/bin/rabbitmq-server"):
        missing.append("rabbitmq-server")
    if not _answers(6379):
        missing.append("redis-server")
    return missing


def _sbin_missing():
    """What the script lists of the tools it finds in /usr/sbin, which it
    adds to any PATH."""
    return [] if os.path.exists("/usr/sbin/logrotate") else ["logrotate"]


@pytest.fixture
def bare_path(tmp_path):
    """A PATH directory holding only ``timeout`` (the script's one
    external command besides the ones it looks for)."""
    (tmp_path / "timeout").symlink_to(shutil.which("timeout"))
    return tmp_path


def _run(path, *args, python=sys.executable, user=None):
    argv = ["/bin/bash", SCRIPT, *args]
    if user is not None:
        argv = [shutil.which("runuser"), "-u", user, "--", *argv]
    env = {"PATH": str(path), "PYTHON": python}
    return subprocess.run(argv, env=env, capture_output=True, text=True,
                          timeout=60, check=False)


def test_hidden_binaries_are_listed(bare_path):
    result = _run(bare_path, "--dry-run")
    assert result.returncode == 0, result.stderr
    # rabbitmq-server and redis-server are hidden too, but listed only
    # when their server does not answer.
    assert result.stdout.split() == _servers_missing() + [
        "strace", "jq", "openssl", "systemd"] + _sbin_missing()


def test_a_binary_on_path_is_not_listed(bare_path):
    (bare_path / "jq").symlink_to(shutil.which("jq") or "/bin/true")
    result = _run(bare_path, "--dry-run")
    assert result.stdout.split() == _servers_missing() + [
        "strace", "openssl", "systemd"] + _sbin_missing()


def test_no_python_that_makes_a_venv_lists_python3_venv(bare_path):
    result = _run(bare_path, "--dry-run", python="/nonexistent/python3")
    assert result.stdout.split()[:2] == ["python3", "python3-venv"]


def test_with_the_full_path_only_what_is_missing_is_listed():
    tools = {"strace": "strace", "jq": "jq", "openssl": "openssl",
             "systemd": "systemd-analyze", "logrotate": "logrotate"}
    expected = [name for name, binary in tools.items()
                if not shutil.which(binary, path=os.environ["PATH"]
                                    + ":/usr/sbin:/sbin")]
    result = _run(os.environ["PATH"], "--dry-run")
    assert result.returncode == 0, result.stderr
    assert [name for name in result.stdout.split()
            if name in tools] == expected


def test_not_root_says_what_to_install_in_one_line(bare_path):
    user = None
    if os.geteuid() == 0:  # the refusal needs a user that is not root
        if not shutil.which("runuser"):
            pytest.skip("root without runuser")
        user = "nobody"
    result = _run(bare_path, python="/usr/bin/python3", user=user)
    assert result.returncode == 1
    assert result.stdout == ""
    line = re.fullmatch(
        r"scripts/debian-packages: missing (.*); run as root, or install "
        r"them: apt-get install (.*)\n", result.stderr)
    assert line, result.stderr
    assert line.group(1) == line.group(2)
    assert line.group(1).endswith("strace jq openssl systemd")
