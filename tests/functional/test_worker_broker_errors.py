"""The worker's broker errors, as an operator meets them: one line, the
right exit code, no traceback, no flood."""

import socket

import pytest

pytestmark = pytest.mark.functional

ROUTING_KEY = "notifications.info"


def _assert_one_line(result, config, prefix, code):
    assert result.returncode == code, result.log_tail()
    assert "Traceback" not in result.log, result.log_tail()
    # the start line, then the error: nothing else (no stats line)
    lines = result.log.splitlines()
    assert len(lines) <= 3, result.log
    assert lines[-1].startswith("shoebox-worker: %s" % prefix), result.log
    assert "msg/s" not in result.log
    return lines[-1]


@pytest.mark.both_brokers
def test_declare_false_and_no_queue_stops_the_start(rabbit, broker, names,
                                                    tmp_path, ft):
    config = ft.worker_config(tmp_path, names, names, url=broker.url,
                              routing_key=ROUTING_KEY, durable=True,
                              consumer_options={"declare": False})
    result = ft.run_worker(config, timeout=30)
    line = _assert_one_line(result, config, "%s [consumer:%s] declare: "
                            % (config, names), 2)
    assert "no queue %r" % names in line
    assert result.elapsed < 10
    assert rabbit.depth(names) is None  # nothing declared


def test_queue_mismatch_names_the_option(rabbit, names, tmp_path, ft):
    rabbit.declare(names, names, ROUTING_KEY, durable=False)
    config = ft.worker_config(tmp_path, names, names, durable=True,
                              routing_key=ROUTING_KEY,
                              consumer_options={"exchange_durable": False})
    result = ft.run_worker(config, timeout=30)
    line = _assert_one_line(result, config, "%s [consumer:%s] durable: "
                            % (config, names), 2)
    assert "queue %r exists on the broker with durable = false" % names \
        in line
    assert "set durable = false" in line


@pytest.mark.both_brokers
def test_wrong_password_is_one_line_on_the_url(rabbit_available, broker,
                                               names, tmp_path, ft):
    config = ft.worker_config(
        tmp_path, names, names, routing_key=ROUTING_KEY, durable=True,
        url=broker.url.replace("guest:guest@", "guest:not-the-password@"))
    result = ft.run_worker(config, timeout=30)
    line = _assert_one_line(result, config, "%s [broker] url: " % config,
                            2)
    assert "ACCESS_REFUSED" in line and "not-the-password" not in line


def test_broker_down_gives_up_in_one_line(names, tmp_path, ft):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = ft.worker_config(
        tmp_path, names, names, routing_key=ROUTING_KEY,
        url="amqp://guest:guest@127.0.0.1:%d//" % port,
        broker={"connect_max_retries": 1})
    result = ft.run_worker(config, timeout=30)
    assert result.returncode == 1, result.log_tail()
    assert "Traceback" not in result.log
    lines = result.log.splitlines()
    # the start, the first failure, the end
    assert len(lines) == 3, result.log
    assert "Connection refused; retrying in 2 s" in lines[1]
    assert lines[2].startswith("shoebox-worker: cannot connect to the "
                               "broker amqp://guest:***@127.0.0.1:%d//"
                               % port)
    assert "connect_max_retries = 1" in lines[2]


@pytest.mark.parametrize("broker", ["rabbitmq4"], indirect=True)
def test_a_transient_queue_refused_by_rabbitmq_4_is_one_line(
        rabbit, broker, names, tmp_path, ft):
    """RabbitMQ 4.3 refuses a queue that is neither durable nor exclusive
    (4.0 when its configuration says so, as the tests' own does): one
    line naming ``[consumer:QUEUE] durable`` and what to write, exit 2,
    nothing declared."""
    rabbit.track_exchange(names)  # declared before the queue is refused
    config = ft.worker_config(tmp_path, names, names, url=broker.url,
                              routing_key=ROUTING_KEY, durable=False)
    result = ft.run_worker(config, timeout=30)
    line = _assert_one_line(result, config, "%s [consumer:%s] durable: "
                            % (config, names), 2)
    assert "transient_nonexcl_queues" in line, line
    assert "set durable = true" in line, line
    assert rabbit.depth(names) is None
