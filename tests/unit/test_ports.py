"""free_port: the kernel's choice, or DBDECK_PORT_RANGE (each parallel test worker gets its own range)."""

import os
import socket

import pytest

from dbdeck.errors import DbdeckError
from dbdeck.plugins.sandbox import servers


@pytest.fixture
def fresh(monkeypatch):
    monkeypatch.setattr(servers, "_handed_out", set())
    return monkeypatch


def test_a_range_hands_out_each_free_port_once_and_skips_ports_in_use(fresh):
    in_use = {21002}  # another process holds it (the real check is a bind: see the next test)
    fresh.setattr(servers, "_bindable", lambda port: port not in in_use)
    fresh.setenv("DBDECK_PORT_RANGE", "21000-21004")
    given = [servers.free_port() for _ in range(4)]
    assert sorted(given) == [21000, 21001, 21003, 21004]
    with pytest.raises(DbdeckError, match="no free port left in DBDECK_PORT_RANGE"):
        servers.free_port()


def test_a_port_someone_listens_on_is_not_bindable():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        assert not servers._bindable(busy.getsockname()[1])


def test_without_a_range_the_kernel_chooses(fresh):
    fresh.delenv("DBDECK_PORT_RANGE", raising=False)
    port = servers.free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", port))  # it was free


@pytest.mark.parametrize("value", ["20000", "b-c", "900-1000", "30000-20000", "65000-70000"])
def test_a_malformed_range_is_one_clear_error(fresh, value):
    fresh.setenv("DBDECK_PORT_RANGE", value)
    with pytest.raises(DbdeckError, match="DBDECK_PORT_RANGE"):
        servers.free_port()


def test_the_suite_gives_this_worker_its_own_range():
    from tests.conftest import WORKER_INDEX

    first, last = (int(part) for part in os.environ["DBDECK_PORT_RANGE"].split("-"))
    assert last - first == 399 and 20000 <= first and last < 32768  # below the kernel's ephemeral ports
    assert (first - 20000) % 2000 == WORKER_INDEX % 5 * 400
