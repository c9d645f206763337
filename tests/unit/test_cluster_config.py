"""The plan of a local cluster (docs/cluster.md): node ids, ports and the controller quorum, the replication factor
and min.insync.replicas the broker count allows, and each replica's port and instance id."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from aiokafka.admin import NewTopic

from deploy.launcher.cli import _cluster, build_parser
from deploy.launcher.kafka import server_properties
from deploy.launcher.layout import ClusterSettings, Layout, free_ports
from services.common.kafka import min_insync_replicas, replicated, replication_factor


def properties(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if line and not line.startswith("#"))


@pytest.mark.parametrize(("brokers", "factor", "min_isr"), [(1, 1, 1), (2, 2, 1), (3, 3, 2), (5, 3, 2)])
def test_replication_follows_the_broker_count_up_to_three(brokers: int, factor: int, min_isr: int) -> None:
    assert (replication_factor(brokers), min_insync_replicas(replication_factor(brokers))) == (factor, min_isr)
    layout = Layout.plan(brokers=brokers)
    assert (layout.replication_factor, layout.min_insync_replicas) == (factor, min_isr)


def test_a_topic_is_created_replicated_keeping_its_own_configs() -> None:
    topic = replicated(NewTopic("t.ledger", 4, 1, topic_configs={"retention.ms": "-1"}), brokers=3)
    assert (topic.name, topic.num_partitions, topic.replication_factor) == ("t.ledger", 4, 3)
    assert topic.topic_configs == {"min.insync.replicas": "2", "retention.ms": "-1"}
    assert replicated(NewTopic("t.flows", 1, 1), brokers=1).topic_configs == {"min.insync.replicas": "1"}


def test_three_nodes_get_their_own_ids_ports_and_one_quorum_of_all_three() -> None:
    layout = Layout.plan(brokers=3)
    assert [(n.node_id, n.port, n.controller_port) for n in layout.brokers] == [
        (1, 19092, 19093), (2, 19094, 19095), (3, 19096, 19097),
    ]  # fmt: skip
    assert layout.bootstrap == "127.0.0.1:19092,127.0.0.1:19094,127.0.0.1:19096"
    assert layout.quorum_voters == "1@127.0.0.1:19093,2@127.0.0.1:19095,3@127.0.0.1:19097"


def test_a_cluster_node_config_names_itself_the_quorum_and_replicated_internal_topics(tmp_path: Path) -> None:
    layout = Layout.plan(brokers=3, kafka_port=29092)
    node = layout.broker(2)
    config = properties(server_properties(tmp_path, node.port, node.controller_port, node_id=2,
                                          voters=layout.quorum_voters, replication=3, min_insync=2))  # fmt: skip
    assert config["node.id"] == "2"
    assert config["controller.quorum.voters"] == "1@127.0.0.1:29093,2@127.0.0.1:29095,3@127.0.0.1:29097"
    assert config["listeners"] == "PLAINTEXT://127.0.0.1:29094,CONTROLLER://127.0.0.1:29095"
    assert config["advertised.listeners"] == "PLAINTEXT://127.0.0.1:29094"
    for key in ("default.replication.factor", "offsets.topic.replication.factor",
                "transaction.state.log.replication.factor"):  # fmt: skip
        assert config[key] == "3", key
    assert config["min.insync.replicas"] == config["transaction.state.log.min.isr"] == "2"
    assert config["log.dirs"] == str(tmp_path)


def test_the_single_broker_config_is_unchanged_by_the_cluster_options(tmp_path: Path) -> None:
    config = properties(server_properties(tmp_path, 19092, 19093))
    assert (config["node.id"], config["controller.quorum.voters"]) == ("1", "1@127.0.0.1:19093")
    assert config["default.replication.factor"] == config["offsets.topic.replication.factor"] == "1"
    assert "broker.session.timeout.ms" not in config  # Kafka's defaults for the one broker `make run` starts


def test_replicas_get_their_own_ports_and_instance_ids_one_replica_keeps_the_service_name() -> None:
    default = Layout.plan()
    assert [(m.name, m.port, m.instance_id) for m in default.members] == [
        ("ingest", 8701, None), ("executor", 8702, "executor-1"), ("projector", 8703, "projector-1"),
        ("api", 8700, None),
    ]  # fmt: skip
    layout = Layout.plan(executors=2, projectors=3)
    executors = layout.of("executor")
    assert [(m.name, m.port) for m in executors] == [("executor-1", 8702), ("executor-2", 8712)]
    assert executors[1].env() == {"FLOWTRAIL_EXECUTOR_WEB_PORT": "8712", "FLOWTRAIL_EXECUTOR_INSTANCE_ID": "executor-2"}
    assert [m.env()["FLOWTRAIL_PROJECTOR_HTTP_PORT"] for m in layout.of("projector")] == ["8703", "8713", "8723"]
    assert layout.member("api").env() == {"FLOWTRAIL_API_PORT": "8700"}
    ports = [m.port for m in layout.members]
    assert len(ports) == len(set(ports))


def test_free_ports_are_distinct_and_the_layout_survives_its_json() -> None:
    layout = Layout.free(brokers=3, executors=2, projectors=2)
    ports = [p for n in layout.brokers for p in (n.port, n.controller_port)] + [m.port for m in layout.members]
    assert len(ports) == len(set(ports)) == 6 + 6
    assert Layout.from_json(layout.to_json()) == layout


def test_free_ports_are_below_the_ephemeral_range_so_no_outgoing_connection_can_take_one_first() -> None:
    # A port from the ephemeral range could become some client socket's local port before the service bound it:
    # a test stack's API once failed with "address already in use" that way.
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = free_ports(200)
    assert len(set(ports)) == 200
    assert all(1024 < p < low for p in ports), [p for p in ports if not 1024 < p < low]
    for port in ports[:20]:  # and nothing listens there: each can be bound now
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_flags_override_the_settings_which_default_to_one_of_each(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("FLOWTRAIL_BROKERS", "FLOWTRAIL_EXECUTORS", "FLOWTRAIL_PROJECTORS"):
        monkeypatch.delenv(name, raising=False)
    assert ClusterSettings().model_dump() == {"brokers": 1, "executors": 1, "projectors": 1}
    monkeypatch.setenv("FLOWTRAIL_BROKERS", "3")
    monkeypatch.setenv("FLOWTRAIL_EXECUTORS", "2")
    args = build_parser().parse_args(["up", "--executors", "4", "--projectors", "2"])
    assert _cluster(args).model_dump() == {"brokers": 3, "executors": 4, "projectors": 2}
    with pytest.raises(SystemExit):
        build_parser().parse_args(["up", "--brokers", "0"])
