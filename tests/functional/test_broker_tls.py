"""TLS to the broker, on the TLS listener of the project's own cluster
(node 1 of ``scripts/rabbit-cluster``: a test CA, ``verify_peer``,
``fail_if_no_peer_cert = false``).

The worker archives over TLS (with and without a client certificate), and
``generate`` publishes over TLS from the worker's config. A broker whose
certificate the worker cannot verify (another CA), and a client
certificate the node refuses (signed by a CA it does not trust), are each
one line and exit 1, at once: no traceback, no endless retry, whatever
``connect_max_retries`` says.
"""

import os
import re
import subprocess
import sys

import pytest

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
        result = ft.run_worker(config, idle_exit=2, timeout=120)
        assert result.returncode == 0, result.log_tail()
        assert "consuming from" in result.log
        assert "amqps://guest:**@127.0.0.1:%s//" % (
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
    line = _one_line(ft.run_worker(config, idle_exit=1, timeout=60))
    assert line.startswith("shoebox-worker: %s [broker] ssl_ca_file: TLS "
                           "to the broker amqps://guest:**@127.0.0.1:"
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
    line = _one_line(ft.run_worker(config, idle_exit=1, timeout=60))
    assert line.startswith("shoebox-worker: %s [broker] ssl_cert_file: TLS "
                           "to the broker amqps://guest:**@127.0.0.1:"
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


def test_check_config_loads_the_tls_files(cluster, names, tmp_path, ft):
    config = _config(ft, tmp_path, cluster, names,
                     ssl_cert_file=cluster.client_cert,
                     ssl_key_file=tmp_path / "missing.key")
    result = subprocess.run([WORKER, "check-config", "--config", config],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert result.stderr == "shoebox-worker: %s [broker] ssl_key_file: %s: " \
        "no such file\n" % (config, tmp_path / "missing.key")
