"""broker_url: any character in a password, as written or
percent-encoded, reaches kombu as it is and never a message."""

from urllib.parse import quote

import kombu
import pytest

from shoebox_worker import broker_url
from shoebox_worker import config
from shoebox_worker.consume import broker
from shoebox_worker.options import OptionError

#: Each character that ends a part of a URL for urllib or kombu, in a
#: password as written, and percent-encoded.
SPECIAL = "/#@%;?:"
PASSWORDS = [
    # (as written in the URL, the password)
    *[("pa%sss" % char, "pa%sss" % char) for char in SPECIAL],
    *[("pa%%%02Xss" % ord(char), "pa%sss" % char) for char in SPECIAL],
    ("a/b#c@d%e;f?g:h", "a/b#c@d%e;f?g:h"),
    ("%2F%23%40%25%3B%3F%3A", "/#@%;?:"),
    ("p%41ss", "pAss"),      # an escape is decoded
    ("p%2541ss", "p%41ss"),  # ...so a literal %41 is written %2541
    ("p%zz%4", "p%zz%4"),    # a % that is no escape is itself
    ("pa ss", "pa ss"),
    ("#;amqp:/x", "#;amqp:/x"),
]


@pytest.mark.parametrize("written, password", PASSWORDS)
def test_any_character_in_the_password(written, password):
    text = "amqp://shoebox:%s@rabbit.example:5673/vhost" % written
    (url,) = broker_url.parse(text)
    assert (url.user, url.password, url.location) == (
        "shoebox", password, "rabbit.example:5673/vhost")
    conn = kombu.Connection(broker_url.kombu_hostname([url]))
    assert (conn.userid, conn.password, conn.hostname, conn.port,
            conn.virtual_host) == ("shoebox", password, "rabbit.example",
                                   5673, "vhost")
    for shown in (url.redacted(), repr(url), str(url),
                  broker_url.redact(text), conn.as_uri()):
        assert written not in shown and password not in shown
        assert "rabbit.example:5673/vhost" in shown


@pytest.mark.parametrize("written, password", PASSWORDS)
def test_failover_urls_with_such_a_password(written, password):
    text = ("amqp://u:%s@h1:5672//; amqp://u:%s@h2:5673/v;"
            % (written, written))
    urls = broker_url.parse(text)
    assert [url.password for url in urls] == [password, password]
    assert [url.location for url in urls] == ["h1:5672//", "h2:5673/v"]
    conn = kombu.Connection(broker_url.kombu_hostname(urls))
    assert len(conn.alt) == 2
    conn.switch(conn.alt[1])
    assert (conn.password, conn.hostname, conn.port) == (password, "h2",
                                                         5673)
    shown = broker_url.redact(text)
    assert shown == "amqp://u:***@h1:5672//;amqp://u:***@h2:5673/v"


def test_make_connection_reads_such_a_password_from_the_config(tmp_path):
    path = tmp_path / "worker.conf"
    path.write_text("[broker]\nurl = amqp://u:${PW}@h1//;amqp://u:${PW}@h2//"
                    "\n[consumer:q]\n[archive]\nworking_directory = %s\n"
                    % tmp_path)
    conf = config.load(path, environ={"PW": "x;amqp#1/@?"})
    conn = broker.make_connection(conf.broker)
    assert (conn.password, conn.hostname) == ("x;amqp#1/@?", "h1")
    assert conn.alt[1].startswith("amqp://u:") and \
        "x;amqp#1/@?" not in conn.alt[1]
    assert "x;amqp" not in repr(conf) and "x;amqp" not in conn.as_uri()


@pytest.mark.parametrize("text, message", [
    ("amqp://u:s3cr/et@h:5a//", "bad port in 'amqp://u:***@h:5a//'"),
    ("amqp://u:s3cr/et@h//;zzz://u:s3cr/et@h",
     "unknown transport 'zzz' (URL 2)"),
    ("amqp://u:s3cr/et@h x//",
     "a URL may not contain spaces outside the password, got "
     "'amqp://u:***@h x//'"),
    ("amqp://u:s3cr%FFet@h//",
     "the password in 'amqp://u:***@h//' is not UTF-8 once "
     "percent-decoded"),
    # no '@': what follows the user's ':' could be the password
    ("amqp://u:s3cr;amqp://h//", "bad port in 'amqp://u:***' (URL 1)"),
    ("u:s3cr/et@h", "expected a URL like amqp://user:password@host:5672//,"
                    " got 'u:***@h'"),
    ("amqp://u:s3cr/et@h1//;h2//", "a ';' after the host in "
     "'amqp://u:***@h1//;h2//': between failover URLs, ';' must be "
     "followed by the next URL's transport://"),
    ("", "must not be empty"),
])
def test_errors_never_show_the_password(text, message):
    with pytest.raises(OptionError) as caught:
        broker_url.parse(text)
    assert str(caught.value) == message
    assert "s3cr" not in broker_url.redact(text)


@pytest.mark.parametrize("text, shown", [
    ("amqp://guest@h//", "amqp://guest@h//"),
    ("memory://", "memory://"),
    ("redis://:pw@h:6379/0", "redis://:***@h:6379/0"),
    ("amqp://[::1]:5672//", "amqp://[::1]:5672//"),
    ("not a url", "not a url"),
])
def test_redact_leaves_what_is_no_password(text, shown):
    assert broker_url.redact(text) == shown


# -- oslo.messaging's transport_url, pasted as it is ------------------------

#: transport_url lines as OpenStack deployments write them (passwords
#: made up; a password's /, #, @ and % percent-encoded, as oslo requires).
TRANSPORT_URLS = [
    # devstack's nova.conf
    "rabbit://stackrabbit:secretrabbit@10.0.0.5:5672/",
    # the nova.conf line
    "rabbit://openstack:pw@ctrl1:5672,openstack:pw@ctrl2:5672/",
    # kolla-ansible: every controller, vhost "/" written "//"
    "rabbit://openstack:Xk2mR8pQ@192.0.2.11:5672,openstack:Xk2mR8pQ@"
    "192.0.2.12:5672,openstack:Xk2mR8pQ@192.0.2.13:5672//",
    # OpenStack-Ansible: a vhost of its own per service, TLS on
    "rabbit://nova:a%2Fb%23c%40d%25e@infra1-rabbit-mq-container-1:5671,"
    "nova:a%2Fb%23c%40d%25e@infra2-rabbit-mq-container-2:5671//nova?ssl=1",
    # TripleO: TLS off in the query, vhost "/"
    "rabbit://guest:Ym9vcw%3D%3D@overcloud-controller-0.internalapi."
    "localdomain:5672/?ssl=0",
    # a named vhost without a leading slash, ssl=true, no port
    "rabbit://cinder:pa%2Css@rabbit.example.net/openstack?ssl=true",
    # IPv6 hosts
    "rabbit://nova:pw@[fd00::11]:5672,nova:pw@[fd00::12]:5672/",
]


def _oslo_view(text):
    """What oslo.messaging's rabbit driver connects to for ``text``:
    ``[(user, password, host, port, vhost)]`` as kombu reads the URL the
    driver makes of each host (impl_rabbit's _transform_transport_url)."""
    from oslo_config import cfg
    from oslo_messaging import transport
    url = transport.TransportURL.parse(cfg.ConfigOpts(), text)
    view = []
    for host in url.hosts:
        made = "amqp://%s:%s@%s:%s/%s" % (
            quote(host.username or "", safe=""),
            quote(host.password or "", safe=""),
            "[%s]" % host.hostname if ":" in host.hostname else
            host.hostname, host.port or 5672, url.virtual_host or "")
        conn = kombu.Connection(made)
        view.append((conn.userid, conn.password, conn.hostname, conn.port,
                     conn.virtual_host))
    return view


def _our_view(text):
    view = []
    for url in broker_url.parse(text):
        conn = kombu.Connection(broker_url.kombu_hostname([url]))
        view.append((conn.userid, conn.password, conn.hostname, conn.port,
                     conn.virtual_host))
    return view


@pytest.mark.parametrize("text", TRANSPORT_URLS)
def test_a_transport_url_reaches_what_oslo_reaches(text):
    assert _our_view(text) == _oslo_view(text)
    # and the password is never shown
    for url in broker_url.parse(text):
        assert url.password not in broker_url.redact(text)
        assert url.password not in url.redacted()


def test_hosts_vhosts_and_defaults_as_oslo_says():
    assert _our_view("rabbit://openstack:pw@ctrl1:5672,openstack:pw@"
                     "ctrl2:5672/") == [
        ("openstack", "pw", "ctrl1", 5672, "/"),
        ("openstack", "pw", "ctrl2", 5672, "/")]
    assert [v[4] for v in _our_view("rabbit://u:p@h//nova")] == ["/nova"]
    assert [v[4] for v in _our_view("rabbit://u:p@h/nova")] == ["nova"]
    assert [v[4] for v in _our_view("rabbit://u:p@h")] == ["/"]
    # a host without a port is on 5672, whatever the query says
    assert [v[3] for v in _our_view("rabbit://u:p@h/?ssl=1")] == [5672]
    # a password holding / # ? as they are is read as well
    assert _our_view("rabbit://u:a/b#c?d@h:5673//") == [
        ("u", "a/b#c?d", "h", 5673, "/")]


def test_redacting_a_transport_url_keeps_every_host():
    text = ("rabbit://openstack:s3cr%2Fet@ctrl1:5672,openstack:s3cr%2Fet@"
            "ctrl2:5672//nova?ssl=1")
    assert broker_url.redact(text) == (
        "rabbit://openstack:***@ctrl1:5672,openstack:***@ctrl2:5672//nova"
        "?ssl=1")
    conf = config.BrokerConfig(url=text)
    assert "s3cr" not in repr(conf) and "s3cr" not in conf.redacted_url()


def test_a_transport_url_host_without_its_at_masks_a_port_not_a_number():
    # user:password with the "user@" forgotten: the password is read as a
    # port, and the error that says so must not show it
    assert broker_url.redact("rabbit://a:b@h1:5672,h2:s3cret,[::1]:5672/"
                             "vh?ssl=1") == (
        "rabbit://a:***@h1:5672,h2:***,[::1]:5672/vh?ssl=1")
    with pytest.raises(config.OptionError) as caught:
        broker_url.parse("rabbit://h1:s3cret/")
    assert "s3cret" not in str(caught.value)
    assert "rabbit://h1:***/" in str(caught.value)


@pytest.mark.parametrize("query, expected", [
    ("ssl=1", {"ssl": True}),
    ("ssl=true", {"ssl": True}),
    ("ssl=0", {"ssl": False}),
    ("heartbeat_timeout_threshold=30&kombu_failover_strategy=shuffle",
     {"heartbeat": 30.0, "failover_strategy": "shuffle"}),
    # oslo's options about the services' own queues: accepted, ignored
    ("amqp_durable_queues=true&rabbit_quorum_queue=true&ssl_version="
     "TLSv1_2", {}),
])
def test_the_query_sets_the_broker_options(query, expected):
    conf = config.BrokerConfig(url="rabbit://u:p@h1:5672,u:p@h2:5672/?"
                                   + query)
    defaults = config.BrokerConfig(url="amqp://h//")
    for key in ("ssl", "heartbeat", "failover_strategy"):
        assert getattr(conf, key) == expected.get(key, getattr(defaults,
                                                               key)), key
    assert conf.tls is expected.get("ssl", False)


def test_the_query_wins_over_the_section_as_oslo_says(tmp_path):
    path = tmp_path / "worker.conf"
    path.write_text("[broker]\nurl = rabbit://u:p@h1,u:p@h2/?ssl=1\n"
                    "ssl = false\nheartbeat = 10\n[consumer:q]\n[archive]\n"
                    "working_directory = %s\n" % tmp_path)
    conf = config.load(path, environ={})
    assert (conf.broker.ssl, conf.broker.heartbeat) == (True, 10.0)
    assert conf.broker.tls
    assert broker.ssl_argument(conf.broker)["cert_reqs"] == 2  # REQUIRED


@pytest.mark.parametrize("text, message", [
    ("rabbit://u:s3cr/et@h1//?sll=1",
     "unknown option 'sll' in the query of 'rabbit://u:***@h1//?sll=1': "
     "not one of oslo.messaging's [oslo_messaging_rabbit] options (did you "
     "mean ssl?)"),
    ("rabbit://u:s3cr/et@h1:56x2//", "bad port in 'rabbit://u:***@h1:56x2//'"),
    ("rabbit://u:s3cr/et@h1,u:s3cr/et@:5672//",
     "no host name in host 2 of 'rabbit://u:***@h1,u:***@:5672//'"),
])
def test_transport_url_mistakes_are_one_line_without_the_password(
        text, message):
    with pytest.raises(OptionError) as caught:
        broker_url.parse(text)
    assert str(caught.value) == message


def test_a_bad_query_value_names_the_option(tmp_path):
    path = tmp_path / "worker.conf"
    path.write_text("[broker]\nurl = rabbit://u:s3cret@h//?ssl=maybe\n"
                    "[consumer:q]\n[archive]\nworking_directory = %s\n"
                    % tmp_path)
    with pytest.raises(config.ConfigError) as caught:
        config.load(path, environ={})
    assert str(caught.value) == (
        "%s [broker] url: ssl=maybe in the URL's query: expected true or "
        "false (or yes/no, on/off, 1/0), got 'maybe'" % path)


def test_every_oslo_rabbit_option_is_known():
    # the query options oslo.messaging reads, none refused here
    import oslo_messaging.opts
    oslo = {opt.name for group, opts in oslo_messaging.opts.list_opts()
            if group == "oslo_messaging_rabbit" for opt in opts}
    assert oslo == set(broker_url.OSLO_QUERY)
