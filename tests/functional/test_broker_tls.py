"""TLS to the broker, on the TLS listeners of the project's own cluster
(``scripts/rabbit-cluster``: every node's, with a test CA, ``verify_peer``,
``fail_if_no_peer_cert = false``; a server certificate for ``localhost``
and ``127.0.0.1``).

The worker archives over TLS (with and without a client certificate), and
``generate`` publishes over TLS from the worker's config. A broker whose
certificate the worker cannot verify (another CA), and a client
certificate the node refuses (signed by a CA it does not trust), are each
one line and exit 1, at once: no traceback, no endless retry, whatever
``connect_max_retries`` says. A failover host is checked against its own
name, not the first URL's. ``generate`` and ``replay`` given a bare
``--url amqps://...`` verify against the system's CAs: the test CA when
``SSL_CERT_FILE`` names it, else one line and exit 1.
"""

import os
import re
import subprocess
import sys

import pytest

from shoebox_worker import broker_url
from shoebox_worker.tools import publish

pytestmark = pytest.mark.functional

ROUTING_KEY = "notifications.info"
WORKER = os.path.join(os.path.dirname(sys.executable), "shoebox-worker")
COUNT = 300


@pytest.fixture(scope="module")
def strangers(tmp_path_factory):
    """Another CA (other-ca.pem), and a client certificate it signed
    (stranger.pem, key included), which the cluster does not trust."""
    import trustme
    d = tmp_path_factory.mktemp("strangers")
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(d / "other-ca.pem"))
    ca.issue_cert("stranger.example").private_key_and_cert_chain_pem \
        .write_to_path(str(d / "stranger.pem"))
    return d


def _config(ft, tmp_path, cluster, names, **tls):
    return ft.worker_config(
        tmp_path, names, names, url=cluster.tls_url,
        routing_key=ROUTING_KEY,
        broker={"ssl_ca_file": cluster.ca, **tls})


def _generate(config, names, count=COUNT):
    return subprocess.run(
        [WORKER, "generate", "--config", config, "--count", str(count),
         "--exchange", names, "--queue", names, "--seed", "7"],
        capture_output=True, text=True, timeout=120,
        stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("client_cert", [False, True],
                         ids=["server-verified", "with-client-cert"])
def test_the_worker_archives_over_tls(cluster, names, tmp_path, ft,
                                      client_cert):
    tls = {"ssl_cert_file": cluster.client_cert,
           "ssl_key_file": cluster.client_key} if client_cert else {}
    config = _config(ft, tmp_path, cluster, names, **tls)
    rabbit = ft.Rabbit(cluster.urls[0])
    rabbit.track_queue(names)
    rabbit.track_exchange(names)
    try:
        published = _generate(config, names)
        assert published.returncode == 0, published.stderr
        assert "%d confirmed" % COUNT in published.stdout, published.stdout
        result = ft.run_worker(config, timeout=120)
        assert result.returncode == 0, result.log_tail()
        assert "consuming from" in result.log
        assert "amqps://guest:***@127.0.0.1:%s//" % (
            cluster.tls_url.rsplit(":", 1)[1].split("/")[0]) in result.log
        records = ft.read_archives(tmp_path / "archive")
        assert len({r.metadata["message_id"] for r in records}) == COUNT
        assert rabbit.depth(names) == 0
    finally:
        rabbit.cleanup()


def _one_line(result):
    assert result.returncode == 1, result.log_tail()
    assert "Traceback" not in result.log, result.log_tail()
    lines = result.log.splitlines()
    # the start line, then the error: no retry in between
    assert len(lines) == 2, result.log
    assert lines[1].startswith("shoebox-worker: "), result.log
    return lines[1]


@pytest.mark.parametrize("retries", ["", "3"])
def test_a_broker_signed_by_another_ca_is_one_line(cluster, names, tmp_path,
                                                   ft, strangers, retries):
    config = ft.worker_config(
        tmp_path, names, names, url=cluster.tls_url,
        routing_key=ROUTING_KEY,
        broker={"ssl_ca_file": strangers / "other-ca.pem",
                "connect_max_retries": retries})
    line = _one_line(ft.run_worker(config, timeout=60))
    assert line.startswith("shoebox-worker: %s [broker] ssl_ca_file: TLS "
                           "to the broker amqps://guest:***@127.0.0.1:"
                           % config), line
    assert "certificate verify failed" in line
    assert "this will not heal by retrying" in line


@pytest.mark.parametrize("retries", ["", "3"])
def test_a_refused_client_certificate_is_one_line(cluster, names, tmp_path,
                                                  ft, strangers, retries):
    config = ft.worker_config(
        tmp_path, names, names, url=cluster.tls_url,
        routing_key=ROUTING_KEY,
        broker={"ssl_ca_file": cluster.ca,
                "ssl_cert_file": strangers / "stranger.pem",
                "connect_max_retries": retries})
    line = _one_line(ft.run_worker(config, timeout=60))
    assert line.startswith("shoebox-worker: %s [broker] ssl_cert_file: TLS "
                           "to the broker amqps://guest:***@127.0.0.1:"
                           % config), line
    assert re.search(r"refuse[sd] the client certificate", line), line


def test_generate_with_another_ca_is_one_line(cluster, names, tmp_path, ft,
                                              strangers):
    config = ft.worker_config(
        tmp_path, names, names, url=cluster.tls_url,
        routing_key=ROUTING_KEY,
        broker={"ssl_ca_file": strangers / "other-ca.pem"})
    result = _generate(config, names, count=1)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert "certificate verify failed" in result.stderr
    assert "retrying will not help: the broker's certificate is not " \
           "trusted" in result.stderr


def test_a_failover_host_is_checked_against_its_own_name(cluster, names,
                                                        tmp_path, ft):
    """The first URL (127.0.0.1, which the certificate covers) refuses the
    connection; the second names node 2 as ``127.1``, an address for
    127.0.0.1 that the certificate does not cover. Checked against the
    first URL's name it would pass; against its own it fails."""
    refusing = ft.closed_port()
    node2 = cluster.tls_urls[1].replace("@127.0.0.1:", "@127.1:")
    config = ft.worker_config(
        tmp_path, names, names, routing_key=ROUTING_KEY,
        url="amqps://guest:guest@127.0.0.1:%d//;%s" % (refusing, node2),
        broker={"ssl_ca_file": cluster.ca, "connect_max_retries": 3})
    result = ft.run_worker(config, timeout=60)
    assert result.returncode == 1, result.log_tail()
    assert "Traceback" not in result.log, result.log_tail()
    line = result.log.splitlines()[-1]
    assert line.startswith("shoebox-worker: %s [broker] ssl_ca_file: TLS "
                           "to the broker amqps://guest:***@127.1:%d// "
                           "failed: TLS: certificate verify failed: "
                           % (config, _port(node2))), line
    assert "not valid for '127.1'" in line, line
    assert "this will not heal by retrying" in line, line


def _port(url):
    return int(url.rsplit(":", 1)[1].split("/")[0])


def test_check_config_loads_the_tls_files(cluster, names, tmp_path, ft):
    config = _config(ft, tmp_path, cluster, names,
                     ssl_cert_file=cluster.client_cert,
                     ssl_key_file=tmp_path / "missing.key")
    result = subprocess.run([WORKER, "check-config", "--config", config],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert result.stderr == "shoebox-worker: %s [broker] ssl_key_file: %s: " \
        "no such file\n" % (config, tmp_path / "missing.key")


# -- generate and replay given a bare amqps:// URL (no --config) -----------

def _tool(*argv, trust_test_ca):
    """``shoebox-worker ARGV`` with the system's CAs as OpenSSL finds them:
    ``SSL_CERT_FILE`` set to the cluster's test CA (which Python's default
    verify paths honour), or unset (the test CA is then not trusted)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("SSL_CERT_FILE", "SSL_CERT_DIR")}
    if trust_test_ca:
        env["SSL_CERT_FILE"] = trust_test_ca
    return subprocess.run([WORKER, *map(str, argv)], capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL,
                          env=env)


def _error_line(result):
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("shoebox-worker: "), result.stderr
    return result.stderr


def test_generate_and_replay_trust_the_systems_cas(cluster, names, tmp_path,
                                                   ft):
    """``generate --url amqps://...`` on node 1 and ``replay --url
    amqps://...`` on node 2 (as ``localhost``), verified against the
    system's CAs: the test CA through SSL_CERT_FILE."""
    rabbit = ft.Rabbit(cluster.urls[0])
    rabbit.track_queue(names)
    rabbit.track_exchange(names)
    try:
        published = _tool("generate", "--url", cluster.tls_url, "--count",
                          COUNT, "--exchange", names, "--queue", names,
                          "--seed", "7", trust_test_ca=cluster.ca)
        assert published.returncode == 0, published.stderr
        assert "%d confirmed" % COUNT in published.stdout, published.stdout
        assert rabbit.depth(names) == COUNT

        config = ft.worker_config(tmp_path, names, names,
                                  url=cluster.urls[0],
                                  routing_key=ROUTING_KEY)
        archived = ft.run_worker(config, timeout=120)
        assert archived.returncode == 0, archived.log_tail()
        records = ft.read_archives(tmp_path / "archive")
        assert len({r.metadata["message_id"] for r in records}) == COUNT
        assert rabbit.depth(names) == 0

        node2 = cluster.tls_urls[1].replace("@127.0.0.1:", "@localhost:")
        replayed = _tool("replay", "--url", node2, "--exchange", names,
                         "--routing-key", ROUTING_KEY, tmp_path / "archive",
                         trust_test_ca=cluster.ca)
        assert replayed.returncode == 0, replayed.stderr
        assert "%d published, %d confirmed" % (COUNT, COUNT) in \
            replayed.stdout, replayed.stdout
        assert rabbit.depth(names) == COUNT
    finally:
        rabbit.cleanup()


def test_without_the_test_ca_generate_and_replay_are_one_line(
        cluster, names, tmp_path, ft):
    """The same commands with SSL_CERT_FILE unset: the system's CAs do not
    include the test CA, so each is one line and exit 1, at once, with
    what to do without --config."""
    rabbit = ft.Rabbit(cluster.urls[0])
    rabbit.declare(names, names, ROUTING_KEY)
    archive = tmp_path / "archive"
    try:
        generated = _tool("generate", "--url", cluster.tls_url, "--count",
                          1, "--exchange", names, "--queue", names,
                          trust_test_ca=None)
        line = _error_line(generated)
        assert rabbit.depth(names) == 0

        config = ft.worker_config(tmp_path, names, names,
                                  url=cluster.urls[0],
                                  routing_key=ROUTING_KEY)
        ft.publish(cluster.urls[0], 5, exchange=names,
                   routing_key=ROUTING_KEY)
        assert ft.run_worker(config).returncode == 0
        assert len(ft.read_archives(archive)) == 5
        replayed = _tool("replay", "--url", cluster.tls_url, "--exchange",
                         names, "--routing-key", ROUTING_KEY, archive,
                         trust_test_ca=None)
        lines = [line, _error_line(replayed)]
    finally:
        rabbit.cleanup()
    for line in lines:
        assert "broker %s: " % broker_url.redact(cluster.tls_url) in line, \
            line
        assert "certificate verify failed" in line, line
        # no [broker] ssl_ca_file to set without --config
        assert line.endswith("; retrying will not help: %s\n"
                             % publish.SYSTEM_CAS_HINT), line
