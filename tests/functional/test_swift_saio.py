"""Smoke test of the Swift all-in-one that scripts/swift-saio starts, and
of its choice of ports.

The smoke test needs ST_AUTH, ST_USER and ST_KEY, e.g. from
    env="$(scripts/swift-saio start)" && eval "$env"
Without them it is skipped, or fails when CI=true. The port tests run
scripts/swift-saio with their own SAIO_DIR, and stop what they start.
"""

import contextlib
import errno
import hashlib
import os
import pathlib
import re
import socket
import subprocess
import uuid

import pytest
from swiftclient import client as swc
from swiftclient.exceptions import ClientException

ENV_VARS = ('ST_AUTH', 'ST_USER', 'ST_KEY')
SAIO = str(pathlib.Path(__file__).resolve().parents[2]
           / 'scripts' / 'swift-saio')
DEFAULT_PORTS = {'PROXY': 28080, 'ACCOUNT': 26202, 'CONTAINER': 26201,
                 'OBJECT': 26200, 'MEMCACHED': 21211}


@pytest.fixture(scope='module')
def conn():
    missing = [name for name in ENV_VARS if not os.environ.get(name)]
    if missing:
        msg = (f'{", ".join(missing)} not set; run: '
               'env="$(scripts/swift-saio start)" && eval "$env"')
        if os.environ.get('CI', '').lower() == 'true':
            pytest.fail(msg)
        pytest.skip(msg)
    c = swc.Connection(authurl=os.environ['ST_AUTH'],
                       user=os.environ['ST_USER'], key=os.environ['ST_KEY'],
                       auth_version='1', retries=0)
    yield c
    c.close()


def test_object_roundtrip(conn):
    container = f'saio-smoke-{uuid.uuid4().hex[:12]}'
    data = os.urandom(1024 * 1024 + 7)
    md5 = hashlib.md5(data).hexdigest()
    conn.put_container(container)
    try:
        assert conn.put_object(container, 'obj', data, etag=md5) == md5

        head = conn.head_object(container, 'obj')
        assert int(head['content-length']) == len(data)
        assert head['etag'] == md5

        _, body = conn.get_object(container, 'obj')
        assert body == data

        _, listing = conn.get_container(container)
        assert [(o['name'], o['bytes'], o['hash']) for o in listing] == [
            ('obj', len(data), md5)]

        conn.delete_object(container, 'obj')
        with pytest.raises(ClientException) as exc:
            conn.head_object(container, 'obj')
        assert exc.value.http_status == 404
    finally:
        for obj in conn.get_container(container, full_listing=True)[1]:
            conn.delete_object(container, obj['name'])
        conn.delete_container(container)


# -- ports --------------------------------------------------------------------

def _saio_env(directory, **ports):
    """The environment for scripts/swift-saio: its own SAIO_DIR, and only
    the SAIO_*_PORT variables given."""
    env = {k: v for k, v in os.environ.items()
           if not re.fullmatch(r'SAIO_\w+_PORT', k)}
    env['SAIO_DIR'] = str(directory)
    for name, port in ports.items():
        env[f'SAIO_{name}_PORT'] = str(port)
    return env


def _saio(command, env):
    return subprocess.run([SAIO, command], env=env, capture_output=True,
                          text=True, timeout=180, check=False)


@contextlib.contextmanager
def _held(ports):
    """Listen on each of ``ports`` that is free, so that all are taken."""
    socks = []
    try:
        for port in ports:
            s = socket.socket()
            try:
                s.bind(('127.0.0.1', port))
                s.listen()
            except OSError as e:
                s.close()
                if e.errno != errno.EADDRINUSE:
                    raise
                continue  # taken already: by another program
            socks.append(s)
        yield
    finally:
        for s in socks:
            s.close()


def test_a_taken_port_set_in_the_environment_is_named(tmp_path, ft):
    taken = socket.socket()
    taken.bind(('127.0.0.1', 0))
    taken.listen()
    port = taken.getsockname()[1]
    free = ft.free_ports(4)
    env = _saio_env(tmp_path, PROXY=port, ACCOUNT=free[0],
                    CONTAINER=free[1], OBJECT=free[2], MEMCACHED=free[3])
    try:
        result = _saio('start', env)
    finally:
        taken.close()
    assert result.returncode == 1
    assert result.stdout == ''
    assert (f'swift-saio: start failed: ports in use by another program: '
            f'{port} (SAIO_PROXY_PORT); set SAIO_PROXY_PORT to free ports'
            in result.stderr.splitlines()), result.stderr
    assert not (tmp_path / 'run' / 'pids').exists()


def test_taken_default_ports_are_replaced_by_free_ones(tmp_path):
    if not os.access('/usr/bin/swift-proxy-server', os.X_OK) \
            and os.geteuid() != 0:
        msg = 'Swift packages missing and not root to install them'
        if os.environ.get('CI', '').lower() == 'true':
            pytest.fail(msg)
        pytest.skip(msg)
    env = _saio_env(tmp_path)
    try:
        with _held(DEFAULT_PORTS.values()):
            result = _saio('start', env)
        assert result.returncode == 0, result.stderr[-3000:]
        auth = re.fullmatch(
            r'export ST_AUTH=http://127\.0\.0\.1:(\d+)/auth/v1\.0\n'
            r'export ST_USER=test:tester\nexport ST_KEY=testing\n',
            result.stdout)
        assert auth, result.stdout
        proxy = int(auth.group(1))
        assert proxy != 28080 and (proxy - 28080) % 10 == 0
        moved = [line for line in result.stderr.splitlines()
                 if 'default ports in use by another program' in line]
        assert len(moved) == 1, result.stderr
        for name, default in DEFAULT_PORTS.items():
            assert re.search(rf'{default} -> \d+ \(SAIO_{name}_PORT\)',
                             moved[0]), moved[0]
        assert f'28080 -> {proxy} (SAIO_PROXY_PORT)' in moved[0]
        # status and a second start use the ports picked, with no variable
        status = _saio('status', env)
        assert status.returncode == 0, status.stdout + status.stderr
        assert f'port {proxy}' in status.stdout
        again = _saio('start', env)
        assert again.returncode == 0, again.stderr[-3000:]
        assert again.stdout == result.stdout
        assert 'already running and healthy' in again.stderr
        conn = swc.Connection(
            authurl=f'http://127.0.0.1:{proxy}/auth/v1.0',
            user='test:tester', key='testing', auth_version='1', retries=0)
        conn.head_account()
        conn.close()
    finally:
        stop = _saio('stop', env)
        assert stop.returncode == 0, stop.stderr
    assert _saio('status', env).returncode == 1
