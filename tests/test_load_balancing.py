"""Client-side load balancing on loopback: one client target over two real ``p2r serve``
processes spreads its calls over both (``round_robin``; gRPC's default ``pick_first`` would send
every call to one), and a server closes each connection after ``max_connection_age_s`` so a
long-lived channel reconnects (and re-resolves its ``dns:///`` target) - with no call failing.

The servers are gateways in front of remote roles (no engine: the cheapest real server); each
answers ``Admin.Status`` with its own ``max_in_flight``, which tells the two apart."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from p2r.services.client import Client
from p2r.services.config import connection_age_options, load_config
from p2r.services.launch import ServerProc, start_server
from p2r.v1 import p2r_pb2 as pb
from p2r.v1 import p2r_pb2_grpc as pb_grpc

AGE_S = 1.0


def _gateway(host: str, max_in_flight: int) -> ServerProc:
    return start_server(["gateway", "--host", host], env={
        "P2R_PERCEIVER_ENDPOINT": "127.0.0.1:9", "P2R_REASONER_ENDPOINT": "127.0.0.1:9",
        "P2R_MAX_IN_FLIGHT": str(max_in_flight), "P2R_MAX_CONNECTION_AGE_S": str(AGE_S),
        "P2R_MAX_CONNECTION_AGE_GRACE_S": "30"}, timeout=120)


@pytest.fixture(scope="module")
def gateways() -> Iterator[tuple[ServerProc, ServerProc]]:
    a = _gateway("127.0.0.1", 11)
    try:
        b = _gateway("127.0.0.2", 22)
    except BaseException:
        a.stop()
        raise
    yield a, b
    a.stop()
    b.stop()


def _client_ports(server_target: str) -> set[int]:
    """Local ports of this network namespace's established TCP connections to ``server_target``
    (only this test connects to it): a new port is a new connection."""
    host, port = server_target.rsplit(":", 1)
    v4 = "{:08X}".format(int.from_bytes(bytes(map(int, host.split("."))), "little"))
    # gRPC opens dual-stack sockets: the peer shows as a v4-mapped IPv6 address in tcp6.
    wanted = {f"{v4}:{int(port):04X}", f"0000000000000000FFFF0000{v4}:{int(port):04X}"}
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[2] in wanted and fields[3] == "01":  # remote address, ESTABLISHED
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def test_connection_age_options_from_config(tmp_path: Path) -> None:
    config = load_config(None, roles=["gateway"], perceiver_endpoint="h:1", reasoner_endpoint="h:2")
    assert connection_age_options(config) == [("grpc.max_connection_age_ms", 300_000),
                                              ("grpc.max_connection_age_grace_ms", 600_000)]
    path = tmp_path / "serve.yaml"
    path.write_text("roles: [gateway]\nperceiver_endpoint: h:1\nreasoner_endpoint: h:2\n"
                    "max_connection_age_s: null\n")
    assert connection_age_options(load_config(path)) == []
    path.write_text("roles: [gateway]\nperceiver_endpoint: h:1\nreasoner_endpoint: h:2\n"
                    "max_connection_age_s: 0.5\nmax_connection_age_grace_s: 2\n")
    assert connection_age_options(load_config(path)) == [("grpc.max_connection_age_ms", 500),
                                                         ("grpc.max_connection_age_grace_ms", 2000)]


def test_round_robin_spreads_one_target_over_two_servers(gateways: tuple[ServerProc, ServerProc]) -> None:
    a, b = gateways
    target = f"ipv4:{a.target},{b.target}"
    with Client(target, timeout_s=30) as client:
        client.wait_ready(60)
        seen: Counter[int] = Counter()
        deadline = time.monotonic() + 60
        while len(seen) < 2:  # until the second subchannel is up too
            assert time.monotonic() < deadline, f"only one server answered: {seen}"
            seen[client.status().max_in_flight] += 1
        spread = Counter(client.status().max_in_flight for _ in range(40))
    assert set(seen) == {11, 22}
    assert set(spread) == {11, 22}, spread
    # The control: the same target on a channel without round_robin sticks to one server.
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.AdminStub(channel)
        assert len({stub.Status(pb.StatusRequest(), timeout=30).max_in_flight for _ in range(20)}) == 1


def test_channel_reconnects_after_max_connection_age(gateways: tuple[ServerProc, ServerProc]) -> None:
    """The server ends the client's connection after ``max_connection_age_s``; the same channel
    opens a new one by itself and every call succeeds (a ``dns:///`` target resolves too)."""
    a, _ = gateways
    port = a.target.rsplit(":", 1)[1]
    with Client(f"dns:///127.0.0.1:{port}", timeout_s=30) as client:
        assert client.status().max_in_flight == 11
        first = _client_ports(a.target)
        assert first, "no connection to the server seen"
        calls = 1
        deadline = time.monotonic() + 120
        while not (_client_ports(a.target) - first):
            assert time.monotonic() < deadline, "the connection was never closed by max_connection_age"
            assert client.status().max_in_flight == 11
            calls += 1
            time.sleep(0.05)
        assert client.status().max_in_flight == 11  # on the new connection
    assert calls >= 1
