"""topologies/: routes and path costs against hand-computed values, hierarchy levels of the
presets, YAML/JSON round trips, and the one-line errors for bad input."""
from __future__ import annotations

import json
import math

import networkx as nx
import pytest
from hypothesis import given, settings, strategies as st

from topologies import (DEVICE_KINDS, Device, Link, Topology, TopologyError, device_kind, hierarchical,
                        load_topology, make_device)

A100_NV = 300e9
IB200 = 25e9  # 200 Gbit/s


# ---------------------------------------------------------------------- helpers
def custom(edges, devices=None, switches=()):
    """A Topology from (a, b, kind, bw, lat) edges; nodes not in `switches` are devices."""
    g = nx.Graph()
    names = devices or []
    for a, b, *_ in edges:
        for n in (a, b):
            if n not in names and n not in switches:
                names.append(n)
    for n in names:
        g.add_node(n, device=Device(n))
    for s in switches:
        g.add_node(s, switch=True)
    for a, b, kind, bw, lat in edges:
        g.add_edge(a, b, link=Link(kind, bw, lat))
    return Topology(g, "test")


# ---------------------------------------------------------------------- catalogue
def test_device_catalogue_values():
    assert device_kind("v100").peak_flops == 125e12 and device_kind("v100").memory_bytes == 32e9
    assert device_kind("a100-80gb").nvlink_bytes_per_s == 300e9
    assert device_kind("h200").memory_bytes == 141e9 and device_kind("h200").peak_flops == 989e12
    assert device_kind("cpu").nvlink_bytes_per_s == 0
    assert device_kind("A100").name == "a100-80gb"  # alias, case-insensitive
    for k in DEVICE_KINDS.values():
        assert 0 < k.achievable_fraction <= 1
    d = make_device("x", "h100", speed=0.5)
    assert (d.kind, d.memory_bytes, d.peak_flops, d.speed) == ("h100", 80e9, 989e12, 0.5)


def test_unknown_device_kind_names_known_kinds():
    with pytest.raises(TopologyError, match="unknown device kind 'tpu'.*a100-80gb"):
        device_kind("tpu")


# ---------------------------------------------------------------------- routes and costs
def test_dgx_routes_and_costs_by_hand():
    t = load_topology("dgx:servers=2,gpus=2,kind=a100-80gb,ib=200")
    assert t.devices == ["s0g0", "s0g1", "s1g0", "s1g1"]
    assert t.device("s1g0").kind == "a100-80gb" and t.device("s1g0").memory_bytes == 80e9
    # inside a server: GPU -> NVSwitch -> GPU, 2 us per link
    assert t.route("s0g0", "s0g1") == [("s0g0", "s0-nvswitch"), ("s0-nvswitch", "s0g1")]
    assert t.path_bandwidth("s0g0", "s0g1") == A100_NV
    assert t.path_latency("s0g0", "s0g1") == pytest.approx(4e-6)
    # across servers: through both NVSwitches and the IB switch
    assert t.route("s0g0", "s1g1") == [("s0g0", "s0-nvswitch"), ("s0-nvswitch", "ib-switch"),
                                       ("ib-switch", "s1-nvswitch"), ("s1-nvswitch", "s1g1")]
    assert t.route("s1g1", "s0g0") == [(b, a) for a, b in reversed(t.route("s0g0", "s1g1"))]
    assert t.path_bandwidth("s0g0", "s1g1") == IB200
    assert t.path_latency("s0g0", "s1g1") == pytest.approx(2e-6 + 5e-6 + 5e-6 + 2e-6)
    # p2p: latency + bytes / bottleneck
    assert t.p2p_time_s("s0g0", "s1g1", 1e6) == pytest.approx(14e-6 + 1e6 / IB200)
    assert t.p2p_time_s("s0g0", "s0g1", 3e8) == pytest.approx(4e-6 + 1e-3)
    # same device: nothing to do
    assert t.route("s0g0", "s0g0") == []
    assert t.path_bandwidth("s0g0", "s0g0") == math.inf
    assert t.path_latency("s0g0", "s0g0") == 0
    assert t.p2p_time_s("s0g0", "s0g0", 1e9) == 0


def test_pcie_ethernet_costs_by_hand():
    t = load_topology("pcie:servers=2,gpus=2,eth=10")
    assert t.path_bandwidth("s0g1", "s1g0") == 1.25e9
    assert t.path_latency("s0g1", "s1g0") == pytest.approx(2 * 5e-6 + 2 * 25e-6)
    assert t.path_bandwidth("s0g0", "s0g1") == 12e9


def test_ring_allreduce_formula():
    t = load_topology("dgx:servers=2,gpus=2")
    ring = ["s0g0", "s0g1", "s1g0", "s1g1"]
    n, nbytes = 4, 1e8
    # neighbour latencies 4, 14, 4, 14 us; slowest neighbour bandwidth is IB
    expect = 2 * (n - 1) * 14e-6 + 2 * (n - 1) / n * nbytes / IB200
    assert t.ring_allreduce_time_s(ring, nbytes) == pytest.approx(expect)
    assert t.ring_allreduce_time_s(["s0g0"], nbytes) == 0
    assert t.ring_allreduce_time_s([], nbytes) == 0
    two = t.ring_allreduce_time_s(["s0g0", "s0g1"], nbytes)
    assert two == pytest.approx(2 * 4e-6 + nbytes / A100_NV)


def test_ideal_has_infinite_bandwidth_and_zero_time():
    t = load_topology("ideal:8")
    assert t.devices == [f"d{i}" for i in range(8)]
    assert t.path_bandwidth("d0", "d7") == math.inf
    assert t.path_latency("d0", "d7") == 0
    assert t.p2p_time_s("d0", "d7", 1e12) == 0
    assert t.ring_allreduce_time_s(t.devices, 1e12) == 0
    assert t.levels() == [(8, math.inf)]


def test_local_preset():
    t = load_topology("local:3")
    assert t.devices == ["d0", "d1", "d2"] and t.device("d2").kind == "cpu"
    assert t.path_bandwidth("d0", "d2") == 5e9
    assert t.path_latency("d0", "d2") == pytest.approx(20e-6)
    assert t.levels() == [(3, 5e9)]


def test_route_prefers_latency_then_hops_then_name():
    # direct a-b is slow to start (10 us); a-s1-s2-b has 3 us in all
    t = custom([("a", "b", "ethernet", 1e9, 10e-6), ("a", "s1", "pcie", 1e10, 1e-6),
                ("s1", "s2", "pcie", 1e10, 1e-6), ("s2", "b", "pcie", 1e10, 1e-6)], switches=("s1", "s2"))
    assert [u for u, _ in t.route("a", "b")] == ["a", "s1", "s2"]
    assert t.path_bandwidth("a", "b") == 1e10
    # equal latency: fewer hops wins
    t = custom([("a", "x", "pcie", 1e9, 2e-6), ("x", "b", "pcie", 1e9, 2e-6),
                ("a", "y", "pcie", 1e9, 1e-6), ("y", "z", "pcie", 1e9, 1e-6),
                ("z", "w", "pcie", 1e9, 1e-6), ("w", "b", "pcie", 1e9, 1e-6)], switches=("x", "y", "z", "w"))
    assert t.route("a", "b") == [("a", "x"), ("x", "b")]
    # equal latency and hops: smaller node names win, either direction
    t = custom([("a", "q", "pcie", 1e9, 1e-6), ("q", "b", "pcie", 1e9, 1e-6),
                ("a", "p", "pcie", 1e9, 1e-6), ("p", "b", "pcie", 1e9, 1e-6)], switches=("q", "p"))
    assert t.route("a", "b") == [("a", "p"), ("p", "b")]
    assert t.route("b", "a") == [("b", "p"), ("p", "a")]


def test_unknown_device_in_route():
    t = load_topology("ideal:2")
    with pytest.raises(TopologyError, match="unknown device 'd9'"):
        t.route("d0", "d9")
    with pytest.raises(TopologyError, match="unknown device"):
        t.device("switch")
    assert t.has_device("d1") and not t.has_device("switch") and not t.has_device("d9")


# ---------------------------------------------------------------------- hierarchy
def test_levels_of_dgx_and_pipedream_presets():
    t = load_topology("dgx:servers=4")
    assert len(t.devices) == 32 and t.devices[8] == "s1g0"
    assert t.levels() == [(8, 300e9), (4, 25e9)]
    assert t.domains(0)[1] == [f"s1g{j}" for j in range(8)]
    assert t.domains(1) == [t.devices]
    assert load_topology("dgx:servers=1").levels() == [(8, 300e9)]
    assert load_topology("dgx:servers=2,gpus=4,kind=h100,ib=400").levels() == [(4, 450e9), (2, 50e9)]

    a = load_topology("pipedream-a")
    assert len(a.devices) == 16 and a.device("s0g0").kind == "v100"
    assert a.levels() == [(4, 12e9), (4, 1.25e9)]
    b = load_topology("pipedream-b")
    assert len(b.devices) == 32
    assert b.levels() == [(8, 150e9), (4, 25e9 / 8)]
    assert load_topology("pipedream-b:servers=2").levels() == [(8, 150e9), (2, 25e9 / 8)]
    assert load_topology("pipedream-a:servers=8").levels() == [(4, 12e9), (8, 1.25e9)]


def test_fattree_routes_through_leaf_and_spine():
    t = load_topology("fattree:gpus=64,per_server=8,kind=h100,ib=400,leaf=4")
    assert t.levels() == [(8, 450e9), (4, 50e9), (2, 50e9)]
    assert len(t.domains(1)) == 2 and len(t.domains(1)[0]) == 32
    hops = t.route("s0g0", "s7g3")
    assert [v for _, v in hops] == ["s0-nvswitch", "leaf0", "spine0", "leaf1", "s7-nvswitch", "s7g3"]
    assert t.path_latency("s0g0", "s7g3") == pytest.approx(2 * 2e-6 + 4 * 5e-6)
    # same leaf: no spine
    assert [v for _, v in t.route("s0g0", "s3g0")] == ["s0-nvswitch", "leaf0", "s3-nvswitch", "s3g0"]


def test_hierarchical_builder_and_spec():
    t = hierarchical([(2, "nvlink", 100e9, 1e-6), (3, "infiniband", 10e9, 4e-6)], kind="a100-40gb")
    assert t.devices == [f"d{i}" for i in range(6)]
    assert t.levels() == [(2, 100e9), (3, 10e9)]
    assert t.domains(0) == [["d0", "d1"], ["d2", "d3"], ["d4", "d5"]]
    assert t.path_latency("d0", "d5") == pytest.approx(2 * 1e-6 + 2 * 4e-6)
    assert t.device("d3").memory_bytes == 40e9

    big = load_topology("hier:8@nvlink:300e9,32@ib:25e9,16@eth:1.25e9")
    assert len(big.devices) == 4096
    assert big.levels() == [(8, 300e9), (32, 25e9), (16, 1.25e9)]
    assert len(big.domains(0)) == 512 and len(big.domains(1)) == 16 and big.domains(2) == [big.devices]
    assert big.path_bandwidth("d0", "d7") == 300e9
    assert big.path_bandwidth("d0", "d8") == 25e9
    assert big.path_bandwidth("d0", "d4095") == 1.25e9
    assert len(big.route("d0", "d4095")) == 6
    assert big.path_latency("d0", "d4095") == pytest.approx(2 * (2e-6 + 5e-6 + 25e-6))

    counts = load_topology("hier:8x32x4")
    assert [c for c, _ in counts.levels()] == [8, 32, 4]
    with_lat = load_topology("hier:4@pcie:12e9:1e-6,2@eth:1.25e9:3e-5,kind=v100")
    assert with_lat.path_latency("d0", "d4") == pytest.approx(2 * 1e-6 + 2 * 3e-5)
    assert with_lat.device("d0").kind == "v100"


def test_levels_inferred_for_custom_graph():
    t = custom([("a", "b", "nvlink", 100e9, 1e-6), ("c", "d", "nvlink", 98e9, 1e-6),
                ("b", "c", "ethernet", 1e9, 1e-5)])
    assert t.levels() == [(2, 98e9), (2, 1e9)]
    assert t.domains(0) == [["a", "b"], ["c", "d"]]
    with pytest.raises(TopologyError, match="level 5 does not exist"):
        t.domains(5)


# ---------------------------------------------------------------------- derived topologies
def test_with_link_params_and_device_speed():
    t = load_topology("dgx:servers=2,gpus=2")
    slow = t.with_link_params(kind="infiniband", bandwidth_bytes_per_s=5e9, latency_s=1e-5)
    assert slow.path_bandwidth("s0g0", "s1g0") == 5e9
    assert slow.path_latency("s0g0", "s1g0") == pytest.approx(2 * 2e-6 + 2 * 1e-5)
    assert slow.levels() == [(2, 300e9), (2, 5e9)]
    assert t.path_bandwidth("s0g0", "s1g0") == IB200  # the original is unchanged
    one = t.with_link_params(edge=("s0-nvswitch", "s0g1"), bandwidth_bytes_per_s=1e9)
    assert one.path_bandwidth("s0g0", "s0g1") == 1e9 and one.path_bandwidth("s1g0", "s1g1") == 300e9
    doubled = t.with_links(lambda a, b, l: Link(l.kind, l.bandwidth_bytes_per_s * 2, l.latency_s))
    assert doubled.path_bandwidth("s0g0", "s1g0") == 2 * IB200
    with pytest.raises(TopologyError, match="no 'ethernet' links"):
        t.with_link_params(kind="ethernet", bandwidth_bytes_per_s=1e9)
    with pytest.raises(TopologyError, match="bandwidth_bytes_per_s must be a positive number"):
        t.with_link_params(kind="infiniband", bandwidth_bytes_per_s=0)

    s = t.with_device_speed({"s1g1": 0.5})
    assert s.device("s1g1").speed == 0.5 and s.device("s0g0").speed == 1.0 and t.device("s1g1").speed == 1.0
    with pytest.raises(TopologyError, match="unknown device 'nope'"):
        t.with_device_speed({"nope": 2.0})


# ---------------------------------------------------------------------- validation
def test_validate_names_device_without_link():
    g = nx.Graph()
    for n in ("a", "b", "lonely"):
        g.add_node(n, device=Device(n))
    g.add_edge("a", "b", link=Link("pcie", 1e9, 1e-6))
    with pytest.raises(TopologyError, match="device 'lonely' has no link"):
        Topology(g).validate()


def test_validate_names_unreachable_device():
    t = custom([("a", "b", "pcie", 1e9, 1e-6), ("c", "d", "pcie", 1e9, 1e-6)])
    with pytest.raises(TopologyError, match="device 'c' cannot be reached"):
        t.validate()


@pytest.mark.parametrize("bw,lat,msg", [(0.0, 1e-6, "bandwidth_bytes_per_s must be a positive number"),
                                        (-1e9, 1e-6, "bandwidth_bytes_per_s must be a positive number"),
                                        (1e9, -1e-6, "latency_s must be a finite number >= 0")])
def test_validate_bad_link_values(bw, lat, msg):
    t = custom([("a", "b", "pcie", bw, lat)])
    with pytest.raises(TopologyError, match=msg):
        t.validate()


def test_constructor_rejects_unmarked_node():
    g = nx.Graph()
    g.add_node("mystery")
    with pytest.raises(TopologyError, match="'mystery' is neither a device"):
        Topology(g)


# ---------------------------------------------------------------------- files
@pytest.mark.parametrize("spec", ["ideal:4", "local:2", "dgx:servers=2,gpus=4", "pipedream-a",
                                  "fattree:gpus=32,leaf=2", "hier:2@nvlink:300e9,2@ib:25e9,2@eth:1.25e9"])
@pytest.mark.parametrize("suffix", [".yaml", ".yml", ".json"])
def test_file_round_trip(tmp_path, spec, suffix):
    t = load_topology(spec).with_device_speed({load_topology(spec).devices[-1]: 0.75})
    path = tmp_path / f"topo{suffix}"
    t.save(path)
    back = Topology.load(path)
    assert back.to_dict() == t.to_dict()
    assert back == t
    assert back.levels() == t.levels()
    assert back.devices == t.devices
    a, b = t.devices[0], t.devices[-1]
    assert back.route(a, b) == t.route(a, b)
    assert load_topology(str(path)) == t


def test_custom_round_trip_without_levels(tmp_path):
    t = custom([("a", "b", "nvlink", 100e9, 1e-6), ("c", "d", "nvlink", 100e9, 1e-6),
                ("b", "sw", "ethernet", 1e9, 1e-5), ("c", "sw", "ethernet", 1e9, 1e-5)], switches=("sw",))
    d = t.to_dict()
    assert "levels" not in d and d["switches"] == ["sw"]
    t.save(tmp_path / "t.json")
    assert Topology.load(tmp_path / "t.json").to_dict() == d
    assert Topology.load(tmp_path / "t.json").levels() == [(2, 100e9), (2, 1e9)]


def test_json_writes_infinity_as_string(tmp_path):
    load_topology("ideal:2").save(tmp_path / "i.json")
    raw = json.loads((tmp_path / "i.json").read_text())
    assert raw["links"][0]["bandwidth_bytes_per_s"] == "inf"
    assert Topology.load(tmp_path / "i.json").path_bandwidth("d0", "d1") == math.inf


def test_hand_written_yaml_with_string_numbers(tmp_path):
    (tmp_path / "t.yaml").write_text(
        "name: two\n"
        "devices:\n  - {name: g0, kind: v100}\n  - {name: g1}\n"
        "links:\n  - {a: g0, b: g1, kind: pcie, bandwidth_bytes_per_s: 12e9, latency_s: 5e-6}\n")
    t = Topology.load(tmp_path / "t.yaml")
    assert t.name == "two" and t.path_bandwidth("g0", "g1") == 12e9 and t.device("g1").kind == "gpu-generic"


def _good_dict():
    return load_topology("dgx:servers=2,gpus=2").to_dict()


@pytest.mark.parametrize("mutate,field", [
    (lambda d: d["links"][3].__setitem__("bandwidth_bytes_per_s", -5), "links[3].bandwidth_bytes_per_s must be a positive number"),
    (lambda d: d["links"][1].__setitem__("latency_s", "soon"), "links[1].latency_s must be a number >= 0"),
    (lambda d: d["links"][0].__setitem__("b", "ghost"), "links[0].b names unknown node 'ghost'"),
    (lambda d: d["links"][0].__setitem__("kind", "carrier-pigeon"), "links[0].kind 'carrier-pigeon' is unknown"),
    (lambda d: d["devices"][2].__setitem__("speed", 0), "devices[2].speed must be a positive number"),
    (lambda d: d["devices"][1].__setitem__("name", "s0g0"), "devices[1].name 's0g0' is used twice"),
    (lambda d: d["devices"][0].pop("name"), "devices[0].name must be a non-empty string"),
    (lambda d: d.pop("links"), "links must be a list"),
    (lambda d: d["levels"][0]["domains"][0].pop(), "levels[0].domains must cover every device"),
    (lambda d: d.__setitem__("colour", "red"), "unknown topology field(s) colour"),
])
def test_malformed_file_names_the_field(tmp_path, mutate, field):
    d = _good_dict()
    mutate(d)
    path = tmp_path / "bad.yaml"
    import yaml
    path.write_text(yaml.safe_dump(d))
    with pytest.raises(TopologyError) as e:
        Topology.load(path)
    assert field in str(e.value)
    assert "\n" not in str(e.value)


def test_bad_files(tmp_path):
    (tmp_path / "x.yaml").write_text("devices: [unclosed\n")
    with pytest.raises(TopologyError, match="is not valid YAML"):
        Topology.load(tmp_path / "x.yaml")
    (tmp_path / "x.json").write_text("{nope")
    with pytest.raises(TopologyError, match="is not valid JSON"):
        Topology.load(tmp_path / "x.json")
    with pytest.raises(TopologyError, match="not found"):
        load_topology(str(tmp_path / "missing.yaml"))
    with pytest.raises(TopologyError, match=r"must end in \.yaml, \.yml or \.json"):
        load_topology("ideal:2").save(tmp_path / "t.txt")


# ---------------------------------------------------------------------- spec errors
def test_unknown_preset_lists_presets():
    with pytest.raises(TopologyError) as e:
        load_topology("supercomputer:9")
    msg = str(e.value)
    assert "unknown topology 'supercomputer:9'" in msg
    for p in ("ideal:N", "local:N", "dgx:", "pcie:", "pipedream-a", "pipedream-b", "fattree:", "hier:"):
        assert p in msg


@pytest.mark.parametrize("spec,msg", [
    ("dgx:servers=0", "servers must be a positive integer"),
    ("dgx:racks=2", "unknown argument 'racks'"),
    ("dgx:kind=tpu", "unknown device kind 'tpu'"),
    ("ideal:two", "N must be a positive integer"),
    ("fattree:gpus=12", "not a multiple of per_server=8"),
    ("hier:8@warp:1e9", "link kind 'warp' is unknown"),
    ("hier:8@nvlink", "must read COUNT@KIND:BANDWIDTH"),
    ("hier:", "give levels"),
])
def test_bad_preset_arguments(spec, msg):
    with pytest.raises(TopologyError, match=msg):
        load_topology(spec)


def test_positional_first_argument_and_defaults():
    assert len(load_topology("dgx:3").devices) == 24
    assert len(load_topology("ideal").devices) == 4
    assert len(load_topology("fattree:128").devices) == 128
    assert load_topology("dgx:servers=2").name == "dgx:servers=2"


# ---------------------------------------------------------------------- properties
@settings(max_examples=30, deadline=None)
@given(counts=st.lists(st.integers(1, 4), min_size=1, max_size=3),
       bws=st.lists(st.sampled_from([1e9, 1e10, 1e11]), min_size=3, max_size=3),
       data=st.data())
def test_routes_are_paths_and_costs_are_consistent(counts, bws, data):
    kinds = ["nvlink", "infiniband", "ethernet"]
    t = hierarchical([(c, kinds[i], bws[i], (i + 1) * 1e-6) for i, c in enumerate(counts)])
    a = data.draw(st.sampled_from(t.devices))
    b = data.draw(st.sampled_from(t.devices))
    hops = t.route(a, b)
    if a == b:
        assert hops == []
        return
    assert hops[0][0] == a and hops[-1][1] == b
    assert all(hops[i][1] == hops[i + 1][0] for i in range(len(hops) - 1))
    assert t.path_bandwidth(a, b) == t.path_bandwidth(b, a) == min(t.link(u, v).bandwidth_bytes_per_s for u, v in hops)
    assert t.path_latency(a, b) == pytest.approx(sum(t.link(u, v).latency_s for u, v in hops))
    assert t.p2p_time_s(a, b, 1e6) == pytest.approx(t.path_latency(a, b) + 1e6 / t.path_bandwidth(a, b))
    # the product of the level counts is the number of devices
    assert math.prod(c for c, _ in t.levels()) == len(t.devices)


def test_every_preset_help_says_its_server_count_and_links():
    import re

    from topologies.presets import PRESET_HELP, PRESETS, presets_help

    assert set(PRESET_HELP) == set(PRESETS)
    for name in ("ideal", "dgx", "pcie", "pipedream-a", "pipedream-b", "fattree"):
        topo = load_topology(name)
        servers = len(topo.domains(0)) if len(topo.levels()) > 1 else 1
        text = PRESET_HELP[name]
        said = 1 if "one server" in text else int(re.search(r"(\d+) servers", text).group(1))
        assert said == servers, (name, text)
        kinds = {topo.graph.edges[e]["link"].kind for e in topo.graph.edges}
        for k in kinds:
            word = {"nvswitch": "NVSwitch", "nvlink": "NVLink", "pcie": "PCIe", "infiniband": "InfiniBand",
                    "ethernet": "Ethernet", "ideal": "infinite bandwidth"}[k]
            assert word.lower() in text.lower(), (name, k, text)
    assert "pipedream-b:servers=2" in presets_help()
    assert load_topology("pipedream-a:kind=v100-16gb").device("s0g0").memory_bytes == 16e9
