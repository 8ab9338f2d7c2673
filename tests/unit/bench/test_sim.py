"""``raypod bench sim``: the production driver, stepped against the simulated group in virtual time."""

from __future__ import annotations

import time

import pytest
from support import assert_implements_group_protocol

from raypod.bench import sim
from raypod.bench.calibration import Calibration, Fit
from raypod.bench.simgroup import FaultPlan, SimGroup, VirtualClock, driver_clock
from raypod.driver.controller import Driver
from raypod.driver.recovery import Recovery
from raypod.driver.state import StateKind
from raypod.recipe import Recipe

CAL = Calibration(actor_call=Fit(0.0, 50e-6), wait=Fit(1e-4, 1e-6), ping=Fit(0.002, 2e-6),
                  regroup=Fit(1.0, 5e-4), step_s=Fit(0.1, 0.0))
"""A test calibration: what each call costs is arbitrary here, the figures follow from it."""


def _rank_windows(cfg):
    """``cfg`` with every rank's window opened by the driver (``train.window_agents_from=0``)."""
    return cfg.model_copy(update={"train": cfg.train.model_copy(update={"window_agents_from": 0})})


def test_the_sim_group_implements_the_protocol(tmp_path):
    group = SimGroup(sim.job_config(4, 5, str(tmp_path)), Recipe(), CAL, VirtualClock())
    assert_implements_group_protocol(group)


def test_the_driver_reads_the_virtual_clock():
    clock = VirtualClock()
    with driver_clock(clock):
        from raypod.driver import ledger

        before = ledger.time.monotonic()
        clock.advance(3600.0)
        assert ledger.time.monotonic() - before >= 3600.0
    assert ledger.time is time  # the real clock is back outside the block


def test_a_kill_goes_through_the_production_state_machine(tmp_path):
    clock, plan = VirtualClock(), FaultPlan(kind="kill", rank=1, step=6)
    with driver_clock(clock):
        d, rec = sim.build(CAL, 8, 10, str(tmp_path), plan, clock)
        assert type(d) is Driver and isinstance(d.recovery, Recovery)
        assert Driver.step is type(d).step  # the driver's own loop, not a copy
        kinds = []
        for _ in range(10_000):
            prev, nxt = d.step()
            if nxt is not prev:
                kinds.append((prev.kind, nxt.kind))
            if nxt.is_terminal:
                break
    assert kinds[:3] == [(StateKind.SCHEDULING, StateKind.RUNNING), (StateKind.RUNNING, StateKind.RECOVERING),
                         (StateKind.RECOVERING, StateKind.RUNNING)]
    assert d.state.kind is StateKind.FINISHED and d.done_step == 10
    ev = d.acct.events[0]
    assert ev.kind == "worker_died" and ev.rank == 1 and ev.step == 6
    assert ev.extra["source_choice"]["chosen"] == "memory"  # recovered in place from memory
    # The modelled rebuild is the calibration's regroup at 8 ranks, in the driver's own phases.
    assert ev.extra["recovery_phases_s"]["rebuild"] == pytest.approx(CAL.regroup.at(8), abs=0.05)
    assert ev.resumed_s - ev.detected_s >= CAL.regroup.at(8)


def test_a_small_run_is_quick_and_reports_every_figure(tmp_path):
    t0 = time.perf_counter()
    result = sim.run(out=str(tmp_path), ranks=(8,), steps=12, cal=CAL, profile_at=None, step_s=0.1)
    assert time.perf_counter() - t0 < 5.0
    p = result["points"][0]
    assert p["state"] == "finished" and p["ranks"] == 8
    assert p["step_period_s"] == pytest.approx(0.1, rel=0.05)  # the step time asked for, not the fit's
    assert 0 < p["kill_p50_s"] <= p["kill_p99_s"]
    assert p["freeze_p99_s"] >= p["freeze_p50_s"] >= p["kill_p50_s"]  # a freeze waits fault.silent_s
    assert p["decision_cpu_s"] is not None and p["memory_peak_gib"] > 0
    assert {"drain", "plan", "rebuild", "first_step"} <= set(p["gap_phases_s"])
    assert result["limiting"]["term"] in p["per_step_terms_s"]
    assert (tmp_path / "sim.json").exists() and "ncclCommShrink" in (tmp_path / "sim.md").read_text()


def test_the_rebuild_is_the_slowest_rank_s_rejoin_cpu_when_the_calibration_has_it(tmp_path):
    cal = Calibration(**{**CAL.__dict__, "regroup_cpu": Fit(0.05, 1e-5)})
    result = sim.run(out=str(tmp_path), ranks=(8,), steps=12, cal=cal, profile_at=None, step_s=0.1)
    p = result["points"][0]
    assert p["rebuild_model"] == "regroup_cpu"
    assert p["gap_phases_s"]["rebuild"] == pytest.approx(cal.regroup_cpu.at(8), abs=0.05)
    assert p["rebuild_shared_cores_s"] == pytest.approx(CAL.regroup.at(8))
    # Until training again: the gap less the step that redoes the one the fault cut short.
    assert p["gap_to_training_s"] == pytest.approx(p["gap_s"] - 0.1)
    assert p["gap_to_training_s"] >= sum(p["gap_phases_s"][k] for k in ("drain", "plan", "rebuild")) - 1e-6


def test_a_freeze_is_found_by_the_real_ping_diagnosis(tmp_path):
    raw = sim.simulate(CAL, 8, steps=10, kill_step=6, kind="freeze")
    ev = raw["events"][0]
    assert ev.kind == "unresponsive" and ev.rank == 1 and raw["state"] == "finished"
    found = ev.detected_s + raw["t_built"] - raw["plan"].at_s
    assert raw["silent_s"] - 0.3 <= found <= raw["silent_s"] + 0.5


def test_without_the_calibration_file_the_suite_says_so_in_one_sentence(tmp_path):
    with pytest.raises(SystemExit, match="scale_calibration.json does not exist: run `raypod bench scale`"):
        sim.run(out=str(tmp_path), ranks=(8,), profile_at=None)


def test_a_large_group_is_sent_a_step_over_several_polls(tmp_path):
    clock = VirtualClock()
    group = SimGroup(sim.job_config(250, 5, str(tmp_path)), Recipe(), CAL, clock)
    group.per_flush = 100  # as InFlight sends at most SUBMIT_PER_POLL calls a poll
    group.start(250, 0, None, [])
    group.submit_step(1)
    assert group.sent == 100 and group.costs.cpu["submit_step"] == pytest.approx(CAL.actor_call.at(100))
    assert group.poll(0.0).steps == []  # 200 sent now; the step cannot finish before all are
    assert group.sent == 200
    results = group.poll(1.0)  # the last 50 go out, then the step's 0.1 s passes
    assert group.sent == 250 and len(results.steps) == 250
    assert group.costs.cpu["submit_step"] == pytest.approx(2 * CAL.actor_call.at(100) + CAL.actor_call.at(50))


def test_the_simulated_probes_report_late_rounds_as_the_driver_s_probes_do(tmp_path):
    # A round of 1.2 s (as 10,000 ranks' node agents take by a steep calibration): once it is
    # answered, the driver is told answers come that late, and allows 1.5x that before silence.
    slow = Calibration(**{**CAL.__dict__, "ping": Fit(1.2, 0.0)})
    clock = VirtualClock()
    group = SimGroup(sim.job_config(16, 5, str(tmp_path)), Recipe(), slow, clock)
    group.world_size = 16
    clock.advance(1.0)
    first = group.probe(0.25)  # a round goes out: 2 node agents, answered 1.2 + 1.2 s later
    assert first.slowest_s == 0.0 and min(first.values()) == 0.0
    clock.advance(3.0)
    assert group.probe(0.25).slowest_s == pytest.approx(3.0, abs=0.05)  # seen 3 s after it was sent


def test_past_agent_zones_from_nodes_a_probe_round_asks_one_leader_per_zone():
    from raypod.bench.simgroup import liveness_round

    cal = Calibration(**{**CAL.__dict__, "ping": Fit(-0.0016, 0.00086)})  # the 12-01 ping line
    calls, round_s, zoned = liveness_round(cal, 10_000)  # 1,250 nodes of 8 ranks
    assert zoned and calls == 35 and round_s == pytest.approx(cal.ping.at(35) + cal.ping.at(36))  # zones of 36
    direct = liveness_round(cal, 10_000, zoned_from=10_000)
    assert direct[:1] == (1_250,) and direct[1] > 1.0 > round_s  # over fault.silent_s unzoned
    assert liveness_round(cal, 64 * 8)[2] is False and liveness_round(cal, 10_000, agents=False)[0] == 10_000


def test_with_step_windows_a_step_costs_a_grant_and_its_streamed_results_not_a_call_per_rank(tmp_path):
    """``train.step_window`` (the default): the ranks' window calls are sent once, then each step
    charges the driver the collection of N streamed results (the calibration's ``stream_item``);
    a save ends the window (the next step opens one again)."""
    cal = Calibration(**{**CAL.__dict__, "stream_item": Fit(1e-4, 20e-6)})
    clock = VirtualClock()
    cfg = _rank_windows(sim.job_config(250, 5, str(tmp_path)))
    assert cfg.train.step_window
    group = SimGroup(cfg, Recipe(), cal, clock)
    group.start(250, 0, None, [])
    for step in (1, 2, 3):
        group.submit_step(step)
    assert group.enqueued == 250 and group.costs.cpu["open_window"] > 0  # one call per rank, once
    assert "submit_step" not in group.costs.cpu
    assert sum(len(group.poll(10.0).steps) for _ in range(3)) == 3 * 250  # collected as they arrive
    assert group.costs.cpu["stream_results"] == pytest.approx(3 * cal.stream_item.at(250))
    group.submit_save(3, "path")
    group.submit_step(4)
    assert group.enqueued == 250 + 250 + 250  # the window's calls, the save's, then the next window's
    per_step = Calibration(**CAL.__dict__)  # measured before step windows: a call per rank and step
    old = SimGroup(cfg, Recipe(), per_step, VirtualClock())
    old.start(250, 0, None, [])
    old.submit_step(1)
    assert old.costs.cpu["submit_step"] > 0 and "open_window" not in old.costs.cpu


def test_with_step_windows_a_large_step_is_collected_over_several_polls(tmp_path):
    """As ``InFlight`` collects at most ``COLLECT_PER_POLL`` streams' results a poll, the driver
    takes a step of 250 ranks in polls of 100, each charged its share (no poll is a block of
    all N results: a failure is seen between them)."""
    cal = Calibration(**{**CAL.__dict__, "stream_item": Fit(1e-4, 20e-6)})
    group = SimGroup(_rank_windows(sim.job_config(250, 5, str(tmp_path))), Recipe(), cal, VirtualClock())
    group.per_collect = 100
    group.start(250, 0, None, [])
    group.submit_step(1)
    group.submit_step(2)
    sizes = [len(group.poll(10.0).steps) for _ in range(5)]
    assert sizes == [100, 100, 50, 100, 100] and group.finished == 1
    assert group.costs.cpu["stream_results"] == pytest.approx(4 * cal.stream_item.at(100) + cal.stream_item.at(50))
    assert len(group.poll(10.0).steps) == 50 and group.finished == 2


def test_a_window_s_steps_start_when_its_calls_arrive(tmp_path):
    """A window opened over several polls (``SUBMIT_PER_POLL`` calls each): its first step ends a
    step's time after the last rank's call went out, and the steps granted meanwhile follow it."""
    cal = Calibration(**{**CAL.__dict__, "stream_item": Fit(1e-4, 20e-6)})
    clock = VirtualClock()
    group = SimGroup(_rank_windows(sim.job_config(250, 5, str(tmp_path))), Recipe(), cal, clock)
    group.per_flush = 100
    group.start(250, 0, None, [])
    group.submit_step(1)
    group.submit_step(2)
    group.poll(0.0)
    group.poll(0.0)  # the last 50 window calls go out now
    sent_at, step_s = clock.t, cal.step_s.at(250)
    first, second = (c[2] for c in group.queue)
    assert first == pytest.approx(sent_at + step_s, abs=1e-3)  # (the poll's wait after the send)
    assert second - first == pytest.approx(step_s)


def test_a_regroup_s_calls_cost_the_driver_a_call_per_node_with_node_agents(tmp_path):
    """As ``WorkerGroup._submit_regroup`` sends them: with node agents (the default) one call per
    node, past ``fault.agent_zones_from`` (64) nodes one per zone of sqrt(nodes) agents, plus
    each rank's result collected; without agents a call per rank."""
    cal = Calibration(**{**CAL.__dict__, "stream_item": Fit(1e-4, 20e-6)})
    group = SimGroup(sim.job_config(400, 5, str(tmp_path)), Recipe(), cal, VirtualClock())
    assert group.cfg.fault.node_agents and group.cfg.fault.agent_zones_from == 64
    group._regroup_calls(400)  # 50 nodes of 8 ranks (RANKS_PER_NODE)
    assert group.costs.cpu["regroup"] == pytest.approx(cal.actor_call.at(50) + cal.stream_item.at(400))
    n = 800
    group = SimGroup(sim.job_config(n, 5, str(tmp_path)), Recipe(), cal, VirtualClock())
    group._regroup_calls(n)  # 100 nodes: 10 zones of 10
    assert group.costs.cpu["regroup"] == pytest.approx(cal.actor_call.at(10) + cal.stream_item.at(n))
    assert group._probe_calls(n) == (10, pytest.approx(cal.ping.at(10) * 2 + cal.ping.at(8)))
    cfg = sim.job_config(n, 5, str(tmp_path))
    direct = SimGroup(cfg.model_copy(update={"fault": cfg.fault.model_copy(update={"node_agents": False})}),
                      Recipe(), cal, VirtualClock())
    direct._regroup_calls(n)
    assert direct.costs.cpu["regroup"] == pytest.approx(cal.actor_call.at(n))


def test_windows_through_node_agents_cost_a_call_and_an_item_per_node(tmp_path):
    """From ``train.window_agents_from`` ranks (64 by default) each node's agent opens its ranks'
    windows and sends their results up in one list per step: the driver opens a window with a
    call per node and collects a step as one item per node, plus unpickling each further rank's
    result (measured in this process); the results come an agent's collection later."""
    cal = Calibration(**{**CAL.__dict__, "stream_item": Fit(1e-4, 20e-6)})
    cfg = sim.job_config(256, 5, str(tmp_path))
    assert cfg.train.window_agents_from == 64 and cfg.fault.node_agents
    group = SimGroup(cfg, Recipe(), cal, VirtualClock())
    group.per_collect = 20  # node streams a poll: 20 nodes of 8 ranks
    group.start(256, 0, None, [])
    group.submit_step(1)
    assert group.enqueued == 32  # one window call per node
    assert group.costs.cpu["open_window"] == pytest.approx(cal.actor_call.at(32))
    sizes = [len(group.poll(10.0).steps) for _ in range(2)]
    assert sizes == [160, 96] and group.finished == 1
    assert 0 < group.unpack_s < 1e-4
    assert group.costs.cpu["stream_results"] == pytest.approx(
        cal.stream_item.at(20) + group.unpack_s * 140 + cal.stream_item.at(12) + group.unpack_s * 84)
    below = SimGroup(sim.job_config(32, 5, str(tmp_path)), Recipe(), cal, VirtualClock())
    below.start(32, 0, None, [])
    below.submit_step(1)
    assert below.enqueued == 32  # under 64 ranks: a window call per rank
