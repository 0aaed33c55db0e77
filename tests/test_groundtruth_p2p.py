"""DeepSpeed's pipeline sends for the vTrain rows (``validation.groundtruth_plan.P2P``): "deepspeed" sends each TP
rank's 1/T slice of the activation and holds the sender until delivered; the row closed form and the simulator
agree under it, and its two parts are checked against hand arithmetic on the links."""
from __future__ import annotations

import pytest

from planner.efficiency import EfficiencyParams
from validation.groundtruth_closed_form import pipe_s, row_model
from validation.groundtruth_plan import NODE_LINK_BYTES_PER_S, p2p_bytes_share, simulate_row_s
from validation.groundtruth_rows import Row

P = EfficiencyParams(0.8, 0.8, 10e-6, 50e-6, 0.005, 4.0, 2e-3)


def _row(gpus, gb, micro, tp, dp, pp, hidden=512, heads=8, layers=8, seq=256):
    return Row("multi" if gpus > 8 else "single", 2, gpus, gb, micro, hidden, heads, layers, seq, tp, dp, pp, 100.0)


@pytest.mark.parametrize("shape", [(2, 16, 2, 1, 1, 2), (8, 32, 1, 1, 2, 4), (4, 8, 2, 2, 1, 2), (16, 16, 2, 8, 1, 2),
                                   (32, 32, 1, 4, 4, 2), (32, 32, 1, 2, 8, 2)])
def test_synchronous_partitioned_sends_closed_form_equals_the_simulator(shape):
    gpus, gb, micro, tp, dp, pp = shape
    r = _row(gpus, gb, micro, tp, dp, pp, layers=2 * pp, hidden=1024 if gpus > 8 else 512, heads=16 if gpus > 8 else 8)
    assert row_model(r, p2p="deepspeed").predict_s(P) == pytest.approx(simulate_row_s(r, P, p2p="deepspeed"), rel=5e-4)


def test_a_tp_rank_sends_its_slice_the_node_link_carries_one_activation_per_replica():
    """TP 4 x DP 2 x PP 2 on 2 servers: stage 0 fills server 0, stage 1 server 1. Posted, all 8 ranks send the whole
    b·s·h·2-byte activation over the one 100 GB/s node link; DeepSpeed's, each sends a quarter: the link time falls by
    8·A·(1 − 1/4)/B, the route latency unchanged."""
    r = _row(16, 16, 2, 4, 2, 2, hidden=1024, heads=16, layers=4)
    a = 2 * 256 * 1024 * 2  # b · s · h · 2 bytes
    posted, ds = row_model(r, p2p="posted").links.p2p_s[0], row_model(r, p2p="deepspeed").links.p2p_s[0]
    assert p2p_bytes_share(r, "deepspeed") == 0.25 and p2p_bytes_share(r, "posted") == 1.0
    assert posted - ds == pytest.approx(8 * a * 0.75 / NODE_LINK_BYTES_PER_S, rel=1e-9)


def test_a_synchronous_send_is_paid_by_its_sender_every_microbatch():
    """Two stages, no TP: with posted sends the pipe pays the two sends once (fill and drain); a sender that waits
    pays its send in every microbatch, so the pipe grows by (m − 1) sends when the slowest stage sends."""
    m = 8
    r = _row(2, 2 * m, 2, 1, 1, 2, layers=4)
    posted, ds = row_model(r, p2p="posted"), row_model(r, p2p="deepspeed")
    c = posted.links.p2p_s[0]
    assert ds.links.p2p_s[0] == pytest.approx(c, rel=1e-12) and c > 0  # TP 1: the whole activation either way
    cp, cd = posted.stage_costs(P), ds.stage_costs(P)
    assert cd.forward_s == pytest.approx((cp.forward_s[0] + c, cp.forward_s[1]))
    assert cd.backward_s == pytest.approx((cp.backward_s[0], cp.backward_s[1] + c))
    assert pipe_s(cd, m) - pipe_s(cp, m) == pytest.approx((m - 1) * c, rel=1e-9)
    assert simulate_row_s(r, P, p2p="deepspeed") - simulate_row_s(r, P, p2p="posted") == pytest.approx((m - 1) * c, rel=2e-3)


def test_an_unknown_p2p_mode_is_refused():
    with pytest.raises(ValueError, match="p2p mode"):
        row_model(_row(2, 16, 2, 1, 1, 2), p2p="eager")


def test_the_p2p_rule_adopts_only_a_lower_multi_node_error_at_no_single_node_cost():
    from validation.groundtruth_cv import adopt_p2p

    base = {"mape_single": 0.0304, "mape_multi": 0.0870}
    assert adopt_p2p(base, {"mape_single": 0.0304, "mape_multi": 0.0847})
    assert adopt_p2p(base, {"mape_single": 0.0313, "mape_multi": 0.0847})  # 0.09 points higher: within the 0.1
    assert not adopt_p2p(base, {"mape_single": 0.0316, "mape_multi": 0.0847})
    assert not adopt_p2p(base, {"mape_single": 0.0300, "mape_multi": 0.0870})


def test_the_cv_refuses_an_unknown_p2p_mode_in_one_line(capsys):
    from validation.groundtruth_cv import main

    assert main(["../shared/data/vtrain", "--p2p", "eager"]) == 2
    assert "--p2p must list" in capsys.readouterr().err
