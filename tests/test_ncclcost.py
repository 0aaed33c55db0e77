"""topologies.ncclcost and the topology's ``collectives`` mode: NCCL's published tuning model reproduced, its limits (large
messages: the ring closed form over the protocol's bandwidth fraction; small: its latency), and both interpreters
(closed form, simulator) pricing an all-reduce the same way."""
from __future__ import annotations

import pytest

from topologies import ncclcost
from sim.collectives import fuse, priced, ring_phases
from topologies.presets import load_topology
from topologies.errors import TopologyError
from topologies.topology import Topology
from validation.groundtruth_closed_form import phases_time_s, row_model
from validation.groundtruth_plan import simulate_row_s
from validation.groundtruth_rows import Row

from tests.test_groundtruth import P, _row

NODE = "hier:8@nvswitch:1.5e+11,kind=a100-80gb"
TWO_NODES = "hier:8@nvswitch:1.5e+11,2@ib:1e+11,kind=a100-80gb"


# ---------------------------------------------------------------------- the published model
# NCCL's tuning log line "Latency/AlgBw" for an all-reduce is latency = baseLat + steps · hwLat (µs), worked by hand
# here from tuning.cc's published tables (baseLat Ring 3.6 / 10.0 / 8.4; hwLat NVLink .47 / 1.9 / 3.4, NET 2.7 / 4.0 /
# 9.6; LL's intra steps ×1.8 and Simple's plateau ×1.9 across nodes).
PUBLISHED_LATENCY_US = [
    # (ranks, nodes, bytes, protocol, µs)
    (8, 1, 1e3, "LL", 3.6 + 14 * 0.47),
    (8, 1, 1e3, "LL128", 10.0 + 14 * 1.9),
    (8, 1, 1e3, "Simple", 8.4 + 14 * 3.4),
    (2, 1, 1e3, "Simple", 8.4 + 2 * 3.4),
    (16, 2, 1e3, "LL", 3.6 + 28 * 0.47 * 1.8 + 2 * 2.7),
    (16, 2, 1e3, "LL128", 10.0 + 28 * 1.9 + 2 * 4.0),
    (16, 2, 1e3, "Simple", 8.4 + 28 * 3.4 + 2 * 9.6),                      # under the plateau's 16/16 · 65536 bytes
    (16, 2, 1e8, "Simple", (8.4 + 28 * 3.4 + 2 * 9.6) * 1.9),              # over it
]


@pytest.mark.parametrize("ranks,nodes,nbytes,protocol,us", PUBLISHED_LATENCY_US)
def test_latency_reproduces_the_published_tuning_table(ranks, nodes, nbytes, protocol, us):
    assert ncclcost.latency_s(protocol, "allreduce", ranks, nodes, nbytes) * 1e6 == pytest.approx(us, rel=1e-9)


def test_bandwidth_fractions_are_the_published_ones():
    f = ncclcost.bandwidth_fraction
    assert f("Simple", "allreduce", 8, 1) == 1.0
    assert f("LL", "allreduce", 8, 1) == 0.25 and f("LL", "all_gather", 8, 1) == pytest.approx(1 / 3)
    assert f("LL", "all_gather", 16, 2) == 0.25
    assert f("LL128", "allreduce", 8, 1) == 0.92 and f("LL128", "allreduce", 4, 4) == 0.7


def test_large_messages_tend_to_the_ring_closed_form_over_the_bandwidth_fraction():
    B = 150e9
    for n in (2, 4, 8):
        S = 16e9
        ring = 2 * (n - 1) / n * S / B
        c = ncclcost.ring_allreduce_s(n, S, B)
        assert c.protocol == "Simple" and c.bandwidth_fraction == 1.0
        assert c.time_s / ring - 1 < 1e-3
        # forced to LL128, the time tends to the ring closed form over 0.92
        ll128 = ncclcost.choose("allreduce", n, 1, S, ring, protocols=("LL128",))
        assert ll128.time_s == pytest.approx(ring / 0.92, rel=1e-3)


def test_small_messages_are_latency_bound_and_the_protocol_moves_ll_ll128_simple_with_size():
    B = 150e9
    tiny = ncclcost.ring_allreduce_s(8, 64, B)
    assert tiny.protocol == "LL" and tiny.time_s == pytest.approx(tiny.latency_s, rel=1e-3)
    order = {"LL": 0, "LL128": 1, "Simple": 2}
    seen = [order[ncclcost.ring_allreduce_s(8, 2.0 ** k, B).protocol] for k in range(6, 34)]
    assert seen == sorted(seen) and set(seen) == {0, 1, 2}
    # the chosen protocol is never slower than any other
    for k in range(6, 34, 3):
        S = 2.0 ** k
        bw = 2 * 7 / 8 * S / B
        best = ncclcost.choose("allreduce", 8, 1, S, bw)
        for p in ncclcost.PROTOCOLS:
            assert best.time_s <= ncclcost.choose("allreduce", 8, 1, S, bw, protocols=(p,)).time_s


# ---------------------------------------------------------------------- the topology option
def test_the_spec_names_the_mode_and_ideal_is_the_default():
    assert load_topology(NODE).collectives == "ideal"
    t = load_topology(NODE + ",collectives=nccl")
    assert t.collectives == "nccl" and len(t.devices) == 8
    assert load_topology("dgx:servers=2,collectives=nccl").collectives == "nccl"
    assert Topology.from_dict(t.to_dict()).collectives == "nccl"
    assert t.with_link_params(latency_s=1e-6).collectives == "nccl"
    with pytest.raises(TopologyError, match="collectives"):
        load_topology(NODE + ",collectives=fast")


def test_ideal_mode_leaves_the_phases_as_they_are():
    t = load_topology(NODE)
    devs = t.devices
    ph = ring_phases(devs, 1e6)
    assert priced(t, devs, ph, 1e6) == (ph, 0.0)


@pytest.mark.parametrize("nbytes", [64.0, 4e6, 25e6, 1e9])
def test_priced_phases_cost_ncclcost_s_time_on_a_node(nbytes):
    """On links nothing else uses, the priced ring costs exactly what NCCL's model predicts for it."""
    t = load_topology(NODE + ",collectives=nccl")
    devs = t.devices
    ph, tail = priced(t, devs, ring_phases(devs, nbytes), nbytes)
    want = ncclcost.ring_allreduce_s(8, nbytes, 1.5e11)
    assert phases_time_s(t, ph) + tail == pytest.approx(want.time_s, rel=1e-9)


@pytest.mark.parametrize("spec,devs", [(NODE, [f"d{i}" for i in range(8)]), (NODE, ["d0", "d3"]),
                                       (TWO_NODES, [f"d{i}" for i in range(16)]), (TWO_NODES, ["d1", "d9"])])
@pytest.mark.parametrize("nbytes", [64.0, 4e6, 1e9])
def test_the_planners_ring_closed_form_is_the_simulators_priced_ring(spec, devs, nbytes):
    """``Topology.ring_allreduce_time_s`` (the cost model's TP and DP rings) under each mode costs what the priced
    phases cost on free links: the planner, the closed form and the simulator time one ring the same way."""
    for mode in ("ideal", "nccl"):
        t = load_topology(spec + f",collectives={mode}")
        ph, tail = priced(t, devs, ring_phases(devs, nbytes), nbytes)
        assert t.ring_allreduce_time_s(devs, nbytes) == pytest.approx(phases_time_s(t, ph) + tail, rel=1e-9)


def test_fuse_keeps_the_bytes_and_merges_only_repeats():
    ph = ring_phases(["a", "b", "c"], 3.0)
    (one,) = fuse(ph)
    assert sorted(x for *_, x in one) == [4.0] * 3  # 2(n − 1) steps of S/n


# ---------------------------------------------------------------------- both interpreters
@pytest.mark.parametrize("shape", [(2, 8, 1, 2, 1, 1), (8, 16, 1, 4, 2, 1), (8, 8, 1, 8, 1, 1), (16, 16, 2, 8, 1, 2)])
def test_closed_form_equals_the_simulator_under_nccl_collectives(shape):
    gpus, gb, micro, tp, dp, pp = shape
    r = _row(gpus, gb, micro, tp, dp, pp, layers=2 * pp)
    closed = row_model(r, collectives="nccl").predict_s(P)
    assert closed == pytest.approx(simulate_row_s(r, P, collectives="nccl"), rel=5e-4)
    assert closed != pytest.approx(row_model(r, collectives="ideal").predict_s(P), rel=1e-6)  # the mode is used


@pytest.mark.parametrize("grad", [4, 2])
def test_closed_form_equals_the_simulator_across_nodes_under_nccl_collectives(grad):
    r = _row(32, 64, 2, 1, 16, 2, hidden=1024, heads=16)  # DP rings (hierarchical) and p2p on the node links
    m = row_model(r, collectives="nccl")
    assert m.predict_s(P, grad) == pytest.approx(simulate_row_s(r, P, gradient_bytes=grad, collectives="nccl"),
                                                 rel=5e-4)


@pytest.mark.parametrize("shape", [(32, 32, 1, 4, 4, 2), (32, 8, 1, 16, 2, 1)])
def test_closed_form_equals_the_folded_simulator_with_tp_across_nodes_under_nccl(shape):
    gpus, gb, micro, tp, dp, pp = shape
    r = _row(gpus, gb, micro, tp, dp, pp, layers=2 * pp, hidden=1024, heads=16)
    assert row_model(r, collectives="nccl").predict_s(P) == pytest.approx(
        simulate_row_s(r, P, collectives="nccl"), rel=5e-4)


def test_the_collectives_adoption_rule_reads_multi_lower_and_single_within_a_tenth_of_a_point(capsys):
    from validation.groundtruth_cv import adopt_collectives, main

    ideal = {"mape_single": 0.030, "mape_multi": 0.087}
    assert adopt_collectives(ideal, {"mape_single": 0.0309, "mape_multi": 0.086})
    assert not adopt_collectives(ideal, {"mape_single": 0.0312, "mape_multi": 0.080})  # single worse by > 0.1 point
    assert not adopt_collectives(ideal, {"mape_single": 0.020, "mape_multi": 0.087})  # multi not lower
    assert main(["/nonexistent/vtrain", "--collectives", "fast"]) == 2
    assert "--collectives" in capsys.readouterr().err
