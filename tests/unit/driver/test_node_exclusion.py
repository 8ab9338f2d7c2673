"""A node that keeps losing ranks is kept out of every later placement."""

from __future__ import annotations

from types import SimpleNamespace

from raypod.config import JobConfig
from raypod.driver.controller import Driver
from raypod.driver.topology import avoid_nodes
from raypod.policies.failures import Failure
from raypod.recipe import Recipe


def test_label_selector_keeps_bundles_off_excluded_nodes():
    assert avoid_nodes(set(), 3) is None
    assert avoid_nodes({"b", "a"}, 2) == [{"ray.io/node-id": "!in(a,b)"}] * 2


def test_node_excluded_after_max_node_failures(tmp_path):
    cfg = JobConfig.model_validate({"name": "x", "recipe": {"target": "raypod.recipe:Recipe"},
                                    "checkpoint": {"storage": str(tmp_path)},
                                    "fault": {"max_node_failures": 2}})
    driver = Driver(cfg, callbacks=[], recipe=Recipe())
    driver.alive_nodes = lambda: {"n0", "n1"}
    driver.group = SimpleNamespace(nodes=["n0", "n1"], excluded_nodes=set())
    kill = Failure(kind="worker_died", rank=1, step=3, time_s=1.0, message="died")
    driver.recovery.count_node_failures(kill)
    assert not driver.excluded_nodes and driver.group.excluded_nodes == set()
    driver.recovery.count_node_failures(Failure(kind="exception", rank=0, step=4, time_s=2.0, message="raised"))
    assert not driver.excluded_nodes  # a step that raised says nothing about its node
    driver.recovery.count_node_failures(kill)
    assert set(driver.excluded_nodes) == {"n1"} and driver.group.excluded_nodes == {"n1"}


def test_the_last_node_is_never_excluded_and_a_failure_counts_once(tmp_path):
    cfg = JobConfig.model_validate({"name": "x", "recipe": {"target": "raypod.recipe:Recipe"},
                                    "checkpoint": {"storage": str(tmp_path)},
                                    "fault": {"max_node_failures": 2}})
    driver = Driver(cfg, callbacks=[], recipe=Recipe())
    driver.alive_nodes = lambda: {"n0"}
    driver.group = SimpleNamespace(nodes=["n0", "n0"], excluded_nodes=set())
    driver.dead_ranks = {0, 1}  # both ranks of one node in one failure: one strike for the node
    driver.recovery.count_node_failures(Failure(kind="worker_died", rank=0, step=3, time_s=1.0, message="died"))
    assert driver.node_failures["n0"] == 1
    driver.recovery.count_node_failures(Failure(kind="worker_died", rank=0, step=5, time_s=2.0, message="died"))
    assert driver.node_failures["n0"] == 2 and not driver.excluded_nodes  # the only node stays

