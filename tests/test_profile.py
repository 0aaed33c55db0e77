"""ModelProfile readers: PipeDream graph.txt, native JSON, uniform specs."""
from __future__ import annotations

from pathlib import Path

import pytest

from planner.profile import ModelProfile, ProfileError, load_profile, parse_uniform_spec, read_pipedream_graph

FIX = Path(__file__).parent / "fixtures"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "pipedream_profiles"


def test_graph_txt_reader_converts_units_and_sums_bracketed_activations():
    p = read_pipedream_graph(FIX / "tiny_branchy.graph.txt")
    assert len(p) == 6
    conv = p.layers[1]
    assert conv.forward_s == pytest.approx(1.5e-3) and conv.backward_s == pytest.approx(3e-3)
    assert conv.saved_bytes == 800.0  # [400; 400]
    assert conv.param_bytes == 96.0
    # the cut after node3 (ReLU) must carry both branches: node3's output and node2's output still used by node4
    order = [l.name.split(":")[0] for l in p.layers]
    assert order == ["node1", "node2", "node3", "node4", "node5", "node6"]
    assert p.layers[2].activation_bytes == 800.0 + 800.0  # node2 (feeds node4) + node3 (feeds node5)
    assert p.layers[4].activation_bytes == 800.0  # only node5's output crosses
    assert p.graph is not None and ("node2", "node4") in p.graph.edges


def test_malformed_graph_line_names_the_line():
    with pytest.raises(ProfileError, match="line 2"):
        read_pipedream_graph(FIX / "bad_number.graph.txt")


def test_json_round_trip(tmp_path):
    p = read_pipedream_graph(FIX / "tiny_branchy.graph.txt")
    p.save(tmp_path / "p.json")
    q = load_profile(str(tmp_path / "p.json"))
    assert q == p


def test_uniform_spec():
    p = parse_uniform_spec("uniform:layers=6,fwd=0.5,bwd=1,act=100,params=40")
    assert len(p) == 6 and p.forward_s(0, 5) == pytest.approx(3.0) and p.param_bytes(0, 5) == 240
    with pytest.raises(ProfileError, match="unknown key"):
        parse_uniform_spec("uniform:layers=2,speed=3")


def test_scaling_to_another_microbatch_size():
    p = parse_uniform_spec("uniform:layers=2,fwd=1,bwd=2").scaled(4)
    assert p.microbatch_size == 4 and p.forward_s(0, 1) == pytest.approx(8.0)


@pytest.mark.skipif(not SHARED.exists(), reason="PipeDream profiles not beside the repo")
@pytest.mark.parametrize("name,nodes", [("vgg16", 41), ("resnet50", 177), ("gnmt", 48), ("inception_v3", 326)])
def test_real_pipedream_profiles_read(name, nodes):
    p = read_pipedream_graph(SHARED / f"{name}.graph.txt")
    assert len(p) == nodes and p.total_s > 0


def test_input_source_carries_no_compute_in_either_cost_model():
    """PipeDream's optimizer drops the data-loading ``Input`` node; both cost models give it no compute."""
    from planner.costmodel import evaluate
    from planner.pipedream import optimize_pipedream
    from planner.plan import Plan, StagePlan
    from topologies.presets import load_topology

    p = read_pipedream_graph(FIX / "input_heavy.graph.txt")
    assert (p.layers[0].forward_s, p.layers[0].backward_s) == (0.0, 0.0)
    assert p.graph.raw_ms[0] == (600.0, 0.0)  # the file's figure is kept for reference
    work_s = (10 + 20 + 5 + 5 + 15 + 30) / 1e3  # the three compute nodes, by hand
    topo = load_topology("ideal:1")
    plan = Plan(model="m", stages=(StagePlan(0, 3, 1, ("d0",)),), schedule="pipedream", microbatches=4)
    assert evaluate(plan, p, topo).bottleneck_s == pytest.approx(work_s, rel=1e-12)
    # PipeDream's own optimizer on one worker: the same compute, the Input node not in it
    assert optimize_pipedream(p, [(1, 1e9)]).pipeline_time_s == pytest.approx(work_s, rel=1e-12)
