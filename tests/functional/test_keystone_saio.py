"""scripts/keystone, and the Swift all-in-one's proxy validating its tokens.

Needs the variables that scripts/keystone exports (``keystone`` fixture in
conftest) and a Swift all-in-one started after them, with
SAIO_KEYSTONE_CONF=$SHOEBOX_TEST_KS_SWIFT_CONF, its ST_* exported as
SHOEBOX_TEST_KS_ST_*: ./scripts/test does both.
Without them the tests skip, or fail when CI=true.

The expired-token test waits for the lifetime of a token taken when the
first test of this module starts (KEYSTONE_TOKEN_EXPIRATION, 20 s by
default), minus the time the other tests took.
"""

import datetime
import os
import pathlib
import re
import subprocess
import time
import urllib.parse
import uuid

import pytest
import requests
from keystone_env import unavailable
from keystoneauth1 import exceptions as ks_exc
from keystoneauth1 import session as ks_session
from keystoneauth1.identity import v3
from swiftclient import client as swc
from swiftclient.exceptions import ClientException

KEYSTONE = str(pathlib.Path(__file__).resolve().parents[2]
               / 'scripts' / 'keystone')


def _password(keystone, **overrides):
    options = dict(auth_url=keystone.auth_url, username=keystone.username,
                   password=keystone.password,
                   project_name=keystone.project_name,
                   user_domain_name=keystone.user_domain_name,
                   project_domain_name=keystone.project_domain_name)
    options.update(overrides)
    return ks_session.Session(auth=v3.Password(**options), timeout=30)


def _storage_url(sess, keystone):
    return sess.get_endpoint(service_type='object-store', interface='public',
                             region_name=keystone.region_name)


def _tempauth():
    """(auth url, user, key) of tempauth on the Swift whose proxy validates
    Keystone's tokens: scripts/test exports its ST_* as SHOEBOX_TEST_KS_ST_*
    (the tests' main Swift has tempauth alone)."""
    names = ('SHOEBOX_TEST_KS_ST_AUTH', 'SHOEBOX_TEST_KS_ST_USER',
             'SHOEBOX_TEST_KS_ST_KEY')
    missing = [name for name in names if not os.environ.get(name)]
    if missing:
        unavailable('%s not set: start the Swift all-in-one with '
                    'SAIO_KEYSTONE_CONF as scripts/test does'
                    % ', '.join(missing))
    return tuple(os.environ[name] for name in names)


def _head(url, token):
    return requests.head(url, headers={'X-Auth-Token': token},
                         timeout=30).status_code


@pytest.fixture(scope='module')
def early_token(keystone):
    """(token, expiry, storage url) of a token taken at once, and accepted
    by the proxy then. A check that took the token's whole life (the
    proxy and Keystone seconds behind under the whole suite: 25 s, and
    three such checks in a row, seen at the start of CI runs) says
    nothing: it is tried again with a new token for up to 240 s; a
    refusal within the token's life fails at once."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        started = time.monotonic()
        sess = _password(keystone)
        access = sess.auth.get_access(sess)
        url = _storage_url(sess, keystone)
        status = _head(url, access.auth_token)
        if status in (200, 204):
            return access, url
        took = time.monotonic() - started
        assert took >= keystone.token_expiration, (status, took)
    pytest.fail('for 240 s, the proxy took longer than a token lives '
                '(%d s)' % keystone.token_expiration)


def test_a_password_token_works_on_the_proxy(keystone, early_token):
    sess = _password(keystone)
    url = _storage_url(sess, keystone)
    # The catalog points at the proxy the tests use, account AUTH_<project>.
    expected = f'/v1/AUTH_{keystone.project_id}'
    assert urllib.parse.urlsplit(url).path == expected
    assert (urllib.parse.urlsplit(url).port
            == urllib.parse.urlsplit(_tempauth()[0]).port)
    conn = swc.Connection(session=sess, retries=0)
    container = f'ks-smoke-{uuid.uuid4().hex[:12]}'
    conn.put_container(container)
    try:
        data = os.urandom(4096)
        conn.put_object(container, 'obj', data)
        assert conn.get_object(container, 'obj')[1] == data
        conn.delete_object(container, 'obj')
    finally:
        conn.delete_container(container)
        conn.close()


@pytest.mark.parametrize('form', ['ids', 'domain ids'])
def test_ids_instead_of_names(keystone, form):
    if form == 'ids':
        sess = _password(keystone, username=None, user_id=keystone.user_id,
                         user_domain_name=None, project_name=None,
                         project_id=keystone.project_id,
                         project_domain_name=None)
    else:
        sess = _password(keystone, user_domain_name=None,
                         user_domain_id=keystone.user_domain_id,
                         project_domain_name=None,
                         project_domain_id=keystone.project_domain_id)
    assert _head(_storage_url(sess, keystone),
                 sess.get_token()) in (200, 204)


@pytest.mark.parametrize('form', ['id', 'name'])
def test_an_application_credential_works(keystone, form):
    if form == 'id':
        auth = v3.ApplicationCredential(
            auth_url=keystone.auth_url,
            application_credential_id=keystone.application_credential_id,
            application_credential_secret=(
                keystone.application_credential_secret))
    else:
        auth = v3.ApplicationCredential(
            auth_url=keystone.auth_url,
            application_credential_name=keystone.application_credential_name,
            application_credential_secret=(
                keystone.application_credential_secret),
            username=keystone.username,
            user_domain_name=keystone.user_domain_name)
    sess = ks_session.Session(auth=auth, timeout=30)
    url = _storage_url(sess, keystone)
    assert url.endswith(f'/v1/AUTH_{keystone.project_id}')
    conn = swc.Connection(session=sess, retries=0)
    try:
        conn.head_account()
    finally:
        conn.close()


def test_a_user_without_the_operator_role_is_refused_403(keystone):
    sess = _password(keystone, username=keystone.norole_username,
                     password=keystone.norole_password)
    token = sess.get_token()  # Keystone lets it in (role reader)...
    assert 'reader' in sess.auth.get_access(sess).role_names
    url = _storage_url(sess, keystone)
    assert _head(url, token) == 403  # ...Swift does not
    conn = swc.Connection(session=sess, retries=0)
    try:
        with pytest.raises(ClientException) as exc:
            conn.put_container(f'ks-norole-{uuid.uuid4().hex[:12]}')
        assert exc.value.http_status == 403
    finally:
        conn.close()


def test_a_wrong_password_is_401(keystone):
    body = {'auth': {
        'identity': {'methods': ['password'], 'password': {'user': {
            'name': keystone.username,
            'domain': {'name': keystone.user_domain_name},
            'password': keystone.password + 'x'}}},
        'scope': {'project': {'name': keystone.project_name, 'domain': {
            'name': keystone.project_domain_name}}}}}
    resp = requests.post(keystone.auth_url + '/auth/tokens', json=body,
                         timeout=30)
    assert resp.status_code == 401
    sess = _password(keystone, password=keystone.password + 'x')
    with pytest.raises(ks_exc.Unauthorized) as exc:
        sess.get_token()
    assert exc.value.http_status == 401


def test_tempauth_works_beside_keystone(keystone):
    url, token = swc.get_auth(*_tempauth(), auth_version='1')
    assert _head(url, token) in (200, 204)
    # The two auths keep to their own accounts.
    assert re.search(r'/v1/TEMPAUTH_', url), url
    keystone_url = _storage_url(_password(keystone), keystone)
    assert _head(keystone_url, token) in (401, 403)
    # Refused, though as a 500: Swift 2.30's tempauth.authorize splits
    # REMOTE_USER, which keystoneauth set to a tuple for this token.
    assert _head(url, _password(keystone).get_token()) // 100 != 2


@pytest.mark.slow
def test_an_expired_token_is_refused(keystone, early_token):
    access, url = early_token
    lifetime = (access.expires - access.issued).total_seconds()
    assert 0 < lifetime <= keystone.token_expiration + 1
    now = datetime.datetime.now(datetime.timezone.utc)
    time.sleep(max(0.0, (access.expires - now).total_seconds()) + 2)
    # Accepted once (early_token), so the proxy has it in its cache.
    assert _head(url, access.auth_token) == 401


def test_start_again_is_a_no_op_that_prints_the_same_env(keystone):
    env = dict(os.environ,
               KEYSTONE_DIR=os.path.dirname(keystone.swift_conf))
    env.pop('KEYSTONE_PORT', None)
    result = subprocess.run([KEYSTONE, 'start'], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert 'already running and healthy' in result.stderr
    exported = dict(re.findall(r'^export (\w+)=(\S*)$', result.stdout,
                               re.MULTILINE))
    assert len(exported) == len(result.stdout.splitlines()) == 18
    for name, value in exported.items():
        assert os.environ.get(name) == value, name


def test_a_taken_port_set_in_the_environment_is_named(tmp_path):
    import socket
    taken = socket.socket()
    taken.bind(('127.0.0.1', 0))
    taken.listen()
    port = taken.getsockname()[1]
    env = dict(os.environ, KEYSTONE_DIR=str(tmp_path), KEYSTONE_PORT=str(port))
    try:
        result = subprocess.run([KEYSTONE, 'start'], env=env,
                                capture_output=True, text=True, timeout=120)
    finally:
        taken.close()
    assert result.returncode == 1
    assert result.stdout == ''
    assert (f'keystone: start failed: port in use by another program: '
            f'{port} (KEYSTONE_PORT); set KEYSTONE_PORT to a free port'
            in result.stderr.splitlines()), result.stderr
    assert not (tmp_path / 'run' / 'pids').exists()
