"""planner.sharding: ZeRO-1/2/3 state bytes and collective bytes against hand-computed closed forms."""
from __future__ import annotations

import pytest

from planner.plan import PlanError
from planner.sharding import (ring_bytes_per_rank, ring_time_s, sharded_state, sharding_traffic,
                              optimizer_bytes_per_param)

N = 8e9  # an 8B model
D = 8


def test_adam_state_is_2_plus_2_plus_12_bytes():
    assert optimizer_bytes_per_param("adam") == 12  # fp32 master 4 + m 4 + v 4
    assert optimizer_bytes_per_param("sgd") == 8
    assert optimizer_bytes_per_param("none") == 4


@pytest.mark.parametrize("stage,expected_gb", [
    (0, 128.0),               # 16 B × 8e9
    (1, 16 + 16 + 96 / 8),    # weights 2·N, grads 2·N, Adam 12·N / 8 = 44 GB
    (2, 16 + 16 / 8 + 96 / 8),  # 30 GB
    (3, 128.0 / 8),           # 16 GB
])
def test_8b_on_8_ranks_exact_bytes(stage, expected_gb):
    s = sharded_state(N, D, stage)
    assert s.total_bytes == pytest.approx(expected_gb * 1e9, rel=1e-12)


def test_stage_3_shards_every_part():
    s = sharded_state(N, D, 3)
    assert (s.weights_bytes, s.gradients_bytes, s.optimizer_bytes) == (2e9, 2e9, 12e9)


def test_degree_one_shards_nothing():
    for stage in range(4):
        assert sharded_state(N, 1, stage) == sharded_state(N, 1, 0)


def test_ring_bytes():
    assert ring_bytes_per_rank(16e9, 8) == pytest.approx(14e9)
    assert ring_bytes_per_rank(16e9, 1) == 0


def test_traffic_zero_1_2_equals_the_allreduce():
    dp = sharding_traffic(N, D, 0)
    assert dp.allreduce_bytes == pytest.approx(2 * 7 / 8 * 2 * N)  # 2(D−1)/D × 16-bit gradients
    for stage in (1, 2):
        t = sharding_traffic(N, D, stage)
        assert t.allreduce_bytes == 0 and t.total_bytes == pytest.approx(dp.total_bytes)


def test_traffic_fsdp_is_one_and_a_half_allreduces():
    t = sharding_traffic(N, D, 3)
    assert t.allgather_bytes == pytest.approx(2 * 7 / 8 * 2 * N)  # forward and backward gathers, bf16
    assert t.reduce_scatter_bytes == pytest.approx(7 / 8 * 2 * N)
    assert t.total_bytes == pytest.approx(1.5 * sharding_traffic(N, D, 0).total_bytes)
    fp32 = sharding_traffic(N, D, 3, gradient_bytes=4, weight_gathers=1)
    assert fp32.allgather_bytes == pytest.approx(7 / 8 * 2 * N) and fp32.reduce_scatter_bytes == pytest.approx(7 / 8 * 4 * N)


def test_ring_time():
    assert ring_time_s(14e9, 50e9, 8) == pytest.approx(0.28)
    assert ring_time_s(14e9, 50e9, 8, latency_s=1e-5) == pytest.approx(0.28 + 7e-5)
    assert ring_time_s(14e9, 50e9, 1) == 0


def test_bad_input():
    with pytest.raises(PlanError, match="ZeRO stage"):
        sharded_state(N, D, 4)
    with pytest.raises(PlanError, match="positive integer"):
        sharded_state(N, 0, 1)
    with pytest.raises(PlanError, match="optimizer"):
        sharded_state(N, D, 1, optimizer="lion")
