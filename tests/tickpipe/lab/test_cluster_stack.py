"""The local Redis Cluster's choice of ports (tickpipe/lab/cluster_stack.py)."""

from __future__ import annotations

import pytest

from tickpipe.lab import cluster_stack
from tickpipe.lab.cluster_stack import CLUSTER_BUS_OFFSET, _ephemeral_low, _free_cluster_ports


def test_a_port_is_never_another_nodes_bus_port(monkeypatch: pytest.MonkeyPatch) -> None:
    # The candidates, in order: a port, then that port's bus port, then another.
    candidates = iter([20001, 20001 + CLUSTER_BUS_OFFSET, 20002 + CLUSTER_BUS_OFFSET, 20003])
    monkeypatch.setattr(cluster_stack.random, "randint", lambda _low, _high: next(candidates))
    monkeypatch.setattr(cluster_stack, "_port_free", lambda _port: True)
    assert _free_cluster_ports(2) == [20001, 20002 + CLUSTER_BUS_OFFSET]


def test_bus_ports_lie_below_the_ephemeral_range() -> None:
    ports = _free_cluster_ports(6)
    assert len(set(ports) | {p + CLUSTER_BUS_OFFSET for p in ports}) == 12
    assert all(port + CLUSTER_BUS_OFFSET < _ephemeral_low() for port in ports)
