"""The package as an operator gets it: ``python -m build`` makes a wheel
and an sdist, the wheel installs in a fresh venv and runs; the
distribution is ``shoebox-worker`` everywhere; the container recipe runs
the worker as PID 1, without root (the image itself is not built here:
no container engine on this machine).

The fresh venv gets the wheel alone (``--no-deps``); its dependencies are
the test venv's, through a ``.pth`` file naming a folder of links to them
(the test venv's own shoebox-worker, an editable install, left out), so
that the test stays offline and takes seconds.
"""

import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import zipfile

import pytest

WORKER = os.path.join(os.path.dirname(sys.executable), "shoebox-worker")
pytestmark = pytest.mark.functional

ROOT = pathlib.Path(__file__).resolve().parents[2]
NAME = "shoebox-worker"


def _run(argv, timeout=300, **kwargs):
    result = subprocess.run(argv, capture_output=True, text=True,
                            timeout=timeout, stdin=subprocess.DEVNULL,
                            **kwargs)
    assert result.returncode == 0, (argv, result.stdout[-2000:],
                                    result.stderr[-3000:])
    return result


def _source_copy(target):
    """The checkout's files (tracked, and new ones not ignored): what a
    fresh clone holds, without touching the checkout."""
    listed = _run(["git", "-C", str(ROOT), "ls-files", "--cached",
                   "--others", "--exclude-standard", "-z"]).stdout
    for name in filter(None, listed.split("\0")):
        source = ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    return target


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """``(wheel, sdist)`` made by ``python -m build`` from a copy of the
    checkout."""
    base = tmp_path_factory.mktemp("package")
    if shutil.which("git") is None:
        pytest.skip("git is needed to list the checkout's files")
    source = _source_copy(base / "src")
    _run([sys.executable, "-m", "build", "--outdir", str(base / "dist"),
          str(source)])
    wheels = list((base / "dist").glob("*.whl"))
    sdists = list((base / "dist").glob("*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, os.listdir(base / "dist")
    return wheels[0], sdists[0]


@pytest.fixture(scope="module")
def fresh_venv(built, tmp_path_factory):
    """A new venv holding the wheel alone, the test venv's dependencies
    reachable through a .pth file; returns its bin folder."""
    wheel, _ = built
    base = tmp_path_factory.mktemp("venv")
    venv = base / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    _run([sys.executable, "-m", "pip", "--python", str(venv / "bin" /
                                                       "python"),
          "install", "--no-deps", "--no-index", "--quiet", str(wheel)])
    # the dependencies: links to the test venv's packages but its own
    deps = base / "deps"
    deps.mkdir()
    for site in {p for p in sys.path if p.endswith("site-packages")}:
        for entry in os.listdir(site):
            if entry.startswith(("shoebox_worker", "__editable__",
                                 "_virtualenv")) or entry.endswith(".pth") \
                    or (deps / entry).exists():
                continue
            (deps / entry).symlink_to(os.path.join(site, entry))
    (site_packages,) = (venv / "lib").glob("python3*/site-packages")
    (site_packages / "test-deps.pth").write_text(str(deps) + "\n")
    return venv / "bin"


def test_build_makes_a_wheel_and_an_sdist_named_shoebox_worker(built):
    wheel, sdist = built
    assert wheel.name.startswith("shoebox_worker-") and \
        wheel.name.endswith("-py3-none-any.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        text = archive.read(metadata).decode()
        points = archive.read(metadata.replace(
            "METADATA", "entry_points.txt")).decode()
    assert re.search(r"^Name: shoebox-worker$", text, re.M)
    assert re.search(r"^Provides-Extra: parquet$", text, re.M)
    assert "shoebox-worker = shoebox_worker.cli:main" in points
    assert "swift = shoebox_worker.ship.swift:SwiftUploadCallback" in points
    data = [n for n in names if ".data/data/share/shoebox-worker/" in n]
    assert sorted(n.rsplit("/", 1)[1] for n in data) == [
        "CHANGELOG.md", "README.md", "shoebox-index-bundle.service",
        "shoebox-index-bundle.timer", "shoebox-worker.conf.sample",
        "shoebox-worker.logrotate", "shoebox-worker.service"]
    assert not [n for n in names if n.startswith("tests/")]
    with tarfile.open(sdist) as archive:
        inside = {n.split("/", 1)[1] for n in archive.getnames() if "/" in n}
    for name in ("README.md", "CHANGELOG.md", "Containerfile", "setup.cfg",
                 "pyproject.toml", "etc/shoebox-worker.conf.sample",
                 "etc/shoebox-worker.service", "etc/shoebox-worker.logrotate",
                 "etc/shoebox-index-bundle.service",
                 "etc/shoebox-index-bundle.timer", "docs/format.md",
                 "shoebox_worker/cli.py"):
        assert name in inside, name


@pytest.mark.slow
def test_the_wheel_runs_from_a_fresh_venv(fresh_venv, tmp_path):
    from shoebox_worker import __version__
    worker = str(fresh_venv / "shoebox-worker")
    assert _run([worker, "--version"]).stdout == "shoebox-worker %s\n" % (
        __version__)
    # the package is the wheel's, not the checkout's
    where = _run([str(fresh_venv / "python"), "-c",
                  "import shoebox_worker; print(shoebox_worker.__file__)"],
                 cwd=tmp_path)
    assert where.stdout.startswith(str(fresh_venv.parent)), where.stdout
    # the sample config the wheel installs checks out (its plugins load
    # from the wheel's entry points)
    sample = fresh_venv.parent / "share" / "shoebox-worker" / \
        "shoebox-worker.conf.sample"
    result = _run([worker, "check-config", "--config", str(sample)],
                  cwd=tmp_path)
    assert result.stdout == "%s: OK\n" % sample
    assert (tmp_path / "var" / "archive").is_dir()


def test_the_distribution_is_named_shoebox_worker_everywhere():
    # every "pip install" of ours names shoebox-worker, or a package of
    # the extras; never PyPI's "shoebox" (StackTach's old library)
    texts = {path: path.read_text() for path in
             [ROOT / "README.md", ROOT / "CHANGELOG.md", ROOT / "setup.cfg",
              ROOT / "Containerfile"] + sorted(
                 (ROOT / "shoebox_worker").rglob("*.py"))}
    for path, text in texts.items():
        for match in re.finditer(r"pip install ([^\s`)\"']+)", text):
            target = match.group(1)
            assert not re.fullmatch(r"shoebox(\[.*)?", target), (
                path, match.group(0))
    setup = (ROOT / "setup.cfg").read_text()
    assert re.search(r"^name = shoebox-worker$", setup, re.M)
    extras = {"parquet": "pyarrow", "zstd": "zstandard"}
    for extra, package in extras.items():
        assert re.search(r"^%s =\n    %s" % (extra, package), setup, re.M)
    from shoebox_worker import cli
    help_text = cli.build_parser()._subparsers._group_actions[0].choices[
        "export"].format_help()
    assert "parquet extra of shoebox-worker" in " ".join(help_text.split())


# -- the container recipe -----------------------------------------------------

def _instructions():
    """The Containerfile's instructions of its last stage, continued lines
    joined."""
    text = re.sub(r"\\\n", " ", (ROOT / "Containerfile").read_text())
    lines = [line.strip() for line in text.splitlines()
             if line.strip() and not line.strip().startswith("#")]
    last = max(i for i, line in enumerate(lines) if line.startswith("FROM "))
    return lines[last:]


def test_the_recipe_runs_the_worker_as_pid_1_without_root():
    lines = _instructions()
    found = {line.split()[0]: line.split(None, 1)[1] for line in lines}
    # exec form: no shell between the engine's SIGTERM and the worker
    assert json.loads(found["ENTRYPOINT"]) == ["shoebox-worker"]
    assert json.loads(found["CMD"]) == [
        "run", "--config", "/etc/shoebox-worker/shoebox-worker.conf"]
    assert found["STOPSIGNAL"] == "SIGTERM"
    user = found["USER"].split(":")[0]
    assert user not in ("root", "0") and int(user) >= 1000
    assert found["WORKDIR"] == "/var/lib/shoebox-worker"
    assert "pip install --no-cache-dir /tmp/dist/*.whl" in found["RUN"]


def test_as_pid_1_sigterm_reaches_the_worker(rabbit, names, tmp_path, ft):
    """What a container engine does: the worker as PID 1 of a PID
    namespace of its own (``unshare``), stopped with SIGTERM: it hears it
    (PID 1 gets only the signals it handles), stops and ships."""
    unshare = shutil.which("unshare")
    if unshare is None or os.geteuid() != 0:
        pytest.skip("needs root and unshare (util-linux) for a PID "
                    "namespace")
    queue = rabbit.track_queue(names)
    rabbit.declare(queue, rabbit.track_exchange(names), "k")
    config = ft.worker_config(tmp_path, queue, names, routing_key="k",
                              callbacks={"gzip": {}})
    log = tmp_path / "worker.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([unshare, "--pid", "--fork", "--kill-child",
                                 WORKER, "run", "--config", config],
                                stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    try:
        ft.wait_until(lambda: "consuming from" in log.read_text(), 30,
                      message="the worker consuming")
        ft.publish(ft.AMQP_URL, 30, names, "k")
        ft.wait_until(lambda: "[1] " in log.read_text(), 5,
                      message="a log line of PID 1")
        (child,) = ft.child_pids(proc.pid)  # PID 1 inside
        os.kill(child, signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert re.search(r"\[1\] got SIGTERM: stopping", text), text[-2000:]
    assert re.search(r"\[1\] stopped$", text, re.M), text[-2000:]
    assert len(ft.read_archives(tmp_path / "archive")) == 30
