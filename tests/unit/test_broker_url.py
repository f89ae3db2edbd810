"""broker_url: any character in a password, as written or
percent-encoded, reaches kombu as it is and never a message."""

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
