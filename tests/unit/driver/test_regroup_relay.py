"""A regroup's calls go through the node agents (``WorkerGroup._submit_regroup``): one call per
node hands the driver every rank's call ref, each rank gets the one shared spec plus its own
index and ring peers; a rank whose agent is gone is called directly. Real Ray actors."""

from __future__ import annotations

import types

import pytest
import ray

from raypod.driver.rank_calls import get_all
from raypod.driver.worker_group import WorkerGroup
from raypod.worker.node_agent import remote_node_agent


@pytest.fixture
def group(ray_connected):
    class Rank:
        """What a rank does with a regroup's call, relayed (``join_as``) or direct."""

        def join_as(self, method, shared, rank, peers, link_first, *args):
            return {"via": "agent", "method": method, "rank": rank, "peers": peers, "first": link_first,
                    "shared_rank": shared.rank, "init": shared.init_method, "args": list(args)}

        def reconfigure(self, spec, *args):
            return {"via": "direct", "method": "reconfigure", "rank": spec.rank, "peers": spec.peers,
                    "first": spec.link_first, "init": spec.init_method, "args": list(args)}

    node = ray.get_runtime_context().get_node_id()
    actors = [ray.remote(num_cpus=0)(Rank).remote() for _ in range(3)]
    agent = remote_node_agent(node).remote(every_s=5.0)
    g = WorkerGroup.__new__(WorkerGroup)
    g.cfg = types.SimpleNamespace(name="cfg", fault=types.SimpleNamespace(agent_zones_from=64))
    g.recipe = types.SimpleNamespace(name="recipe")
    g.actors, g.nodes, g.peer_to, g.world_size = actors, [node] * 3, [1, 2, 0], 3
    g.probes = types.SimpleNamespace(relays={node: agent})
    yield g, agent
    for a in [*actors, agent]:
        ray.kill(a)


def test_a_regroup_s_calls_go_through_the_node_agent_with_one_shared_spec(group):
    g, _ = group
    refs, relayed = g._submit_regroup("tcp://h:1/abc", 2, [], lambda r: ("reconfigure", (9, [(r, 0, 0)])), 10.0)
    assert relayed == 3
    got = get_all(refs, 10.0)
    assert [x["via"] for x in got] == ["agent"] * 3
    assert [x["rank"] for x in got] == [0, 1, 2] and {x["shared_rank"] for x in got} == {0}
    assert [x["peers"] for x in got] == [(1, 2), (2, 0), (0, 1)]  # (peer_to, peer_from) per rank
    assert [x["args"] for x in got] == [[9, [(r, 0, 0)]] for r in range(3)]
    assert {x["init"] for x in got} == {"tcp://h:1/abc"} and {x["method"] for x in got} == {"reconfigure"}


def test_a_rank_whose_agent_is_gone_is_called_directly(group):
    g, agent = group
    ray.kill(agent)
    refs, relayed = g._submit_regroup("tcp://h:1/def", 2, [], lambda r: ("reconfigure", (4,)), 10.0)
    assert relayed == 0
    got = get_all(refs, 10.0)
    assert [(x["via"], x["rank"], x["peers"], x["args"]) for x in got] == [
        ("direct", 0, (1, 2), [4]), ("direct", 1, (2, 0), [4]), ("direct", 2, (0, 1), [4])]


def test_past_agent_zones_from_a_zone_leader_submits_through_its_zone_s_agents(group):
    """Three "nodes" (three agents on this machine; node ids are only labels to them), zoned
    from one node on: zones of two agents, the driver calls each zone's leader
    (``NodeAgent.submit_zone``); a member whose agent is gone leaves its rank to the driver."""
    g, agent = group
    node = g.nodes[0]
    others = [remote_node_agent(node).remote(every_s=5.0) for _ in range(2)]
    try:
        g.nodes = ["n0", "n1", "n2"]
        g.probes = types.SimpleNamespace(relays={"n0": agent, "n1": others[0], "n2": others[1]})
        g.cfg.fault.agent_zones_from = 1
        refs, relayed = g._submit_regroup("tcp://h:1/z", 2, [], lambda r: ("reconfigure", (r,)), 10.0)
        assert relayed == 3
        assert [(x["via"], x["rank"], x["args"]) for x in get_all(refs, 10.0)] == [
            ("agent", 0, [0]), ("agent", 1, [1]), ("agent", 2, [2])]
        ray.kill(others[0])  # n1's agent, a member of the first zone (led by n0's)
        refs, relayed = g._submit_regroup("tcp://h:1/z2", 2, [], lambda r: ("reconfigure", (r,)), 10.0)
        assert relayed == 2
        assert [x["via"] for x in get_all(refs, 10.0)] == ["agent", "direct", "agent"]
    finally:
        for a in others:
            ray.kill(a)


def test_past_agent_zones_from_a_call_to_every_rank_goes_through_the_zone_leaders(group):
    from raypod.driver.rank_calls import call_ranks

    g, agent = group
    node = g.nodes[0]
    others = [remote_node_agent(node).remote(every_s=5.0) for _ in range(2)]
    try:
        relays = {"n0": agent, "n1": others[0], "n2": others[1]}
        got = call_ranks("reconfigure", [0, 1, 2], g.actors, ["n0", "n1", "n2"], relays,
                         (types.SimpleNamespace(rank=7, peers=None, link_first=None, init_method="i"),), 10.0,
                         zoned_from=1)
        assert sorted(got.answers) == [0, 1, 2] and not got.failed and not got.late
        assert {a["rank"] for a in got.answers.values()} == {7}
        ray.kill(others[1])  # n2's agent: a zone of its own, led by it
        ray.kill(others[0])  # n1's: a member of n0's zone
        got = call_ranks("reconfigure", [0, 1, 2], g.actors, ["n0", "n1", "n2"], relays,
                         (types.SimpleNamespace(rank=8, peers=None, link_first=None, init_method="i"),), 10.0,
                         zoned_from=1)
        assert sorted(got.answers) == [0, 1, 2] and not got.failed and not got.late  # the lost agents' ranks directly
    finally:
        for a in others:
            ray.kill(a)
