"""Smoke test of the Swift all-in-one that scripts/swift-saio starts.

Needs ST_AUTH, ST_USER and ST_KEY, e.g. from
    env="$(scripts/swift-saio start)" && eval "$env"
Without them the module is skipped, or fails when CI=true.
"""

import hashlib
import os
import uuid

import pytest
from swiftclient import client as swc
from swiftclient.exceptions import ClientException

ENV_VARS = ('ST_AUTH', 'ST_USER', 'ST_KEY')


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
