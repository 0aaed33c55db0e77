"""validation.groundtruth_cv's residuals by feature: the grouping against a brute-force count, and the flag end to end."""
from __future__ import annotations

import random

import pytest

from validation.groundtruth_cv import DESIGNS, FEATURES, by_feature, main
from validation.groundtruth_rows import FILES, Row, is_calibration


def _row(source, tp, dp, pp, micro, gb, line=2):
    return Row(source, line, tp * dp * pp, gb, micro, 512, 8, 8, 256, tp, dp, pp, 100.0)


def test_by_feature_matches_a_brute_force_count_per_file_and_bucket():
    rng = random.Random(7)
    rows = [_row(rng.choice(("single", "multi")), rng.choice((1, 2, 4)), rng.choice((1, 2, 8)), rng.choice((1, 2, 4)),
                 rng.choice((1, 2)), 64, line=i) for i in range(60)]
    rows = list({r.canonical: r for r in rows}.values())
    errs = {r.canonical: rng.uniform(-0.3, 0.3) for r in rows}
    cv = {"errors": {DESIGNS[0]: errs}, "rows": {r.canonical: r for r in rows}}
    table = by_feature(cv)
    for src in ("single", "multi"):
        mine = [r for r in rows if r.source == src]
        for name, key in FEATURES:
            groups = table[src][name]
            assert sum(g["n"] for g in groups.values()) == len(mine)
            for bucket, g in groups.items():
                e = [errs[r.canonical] for r in mine if key(r) == bucket]
                assert g["n"] == len(e)
                assert g["mean"] == pytest.approx(sum(e) / len(e))
                assert g["mape"] == pytest.approx(sum(map(abs, e)) / len(e))
    # the m/PP buckets: 64 samples, micro 2, DP 8 -> 4 microbatches; PP 4 -> 1 per stage
    r = _row("multi", 1, 8, 4, 2, 64)
    assert dict(FEATURES)["m/PP"](r) == "m/PP < 2"
    assert dict(FEATURES)["m/PP"](_row("multi", 1, 1, 1, 1, 64)) == "m/PP >= 8"


SINGLE_HEADER = ("\ufeff# GPUs,global batch,micro batch,hidden size,attention heads,# layers,sequence length,"
                 "tensor parallelism,data parallelism,pipeline parallelism,iteration time (ms)\n")
MULTI_HEADER = ("\ufeffParameters (billion),# GPUs,global batch,micro batch,hidden size,attention heads,# layers,"
                "sequence length,tensor parallelism,data parallelism,pipeline parallelism,iteration time (ms)\n")


def test_the_by_feature_flag_prints_the_tables_for_calibration_rows_only(tmp_path, capsys):
    """A small data folder whose calibration rows are found by the rule; the flag adds the tables and reads no other row."""
    single, n = [], 0
    for gb in range(8, 4000, 8):
        for tp, dp, pp in ((1, 2, 1), (2, 1, 1), (1, 1, 2)):
            line = f"2,{gb},1,512,8,8,256,{tp},{dp},{pp},{50 + gb * 0.5:.1f}"
            canon = f"single|gpus=2|global={gb}|micro=1|hidden=512|heads=8|layers=8|seq=256|tp={tp}|dp={dp}|pp={pp}"
            if is_calibration(canon) and n < 30:
                single.append(line)
                n += 1
    (tmp_path / FILES["single"]).write_text(SINGLE_HEADER + "\n".join(single) + "\n", encoding="utf-8")
    (tmp_path / FILES["multi"]).write_text(MULTI_HEADER, encoding="utf-8")
    assert main([str(tmp_path), "--collectives", "ideal", "--by-feature"]) == 0
    out = capsys.readouterr().out
    assert "by feature" in out and "single by TP" in out and "single by (TP, DP)" in out
    assert f"inside the {n} calibration rows" in out
