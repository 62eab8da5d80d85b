"""benchmarks/deploy.py's aims: issue 27's figures from the rows' scores and latencies."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import deploy


def test_our_qat_export_on_its_fastest_runtime_is_compared_with_the_most_accurate_and_the_fastest_ptq_rows() -> None:
    scores = {
        deploy.FP32: [0.90],
        deploy.ORT_DYNAMIC: [0.880],  # the fastest PTQ row
        deploy.ORT_STATIC: [0.870, 0.874, 0.872],
        deploy.OV_PTQ: [0.884, 0.886, 0.888],  # the most accurate PTQ row, mean 0.886
        deploy.NNCF_QAT: [0.890, 0.892, 0.894],
        deploy.OURS_OV: [0.894, 0.896, 0.898],
        deploy.OURS_ORT: [0.893, 0.895, 0.897],  # mean 0.895, on our fastest runtime
    }
    ms = {deploy.FP32: 100.0, deploy.ORT_DYNAMIC: 40.0, deploy.ORT_STATIC: 55.0, deploy.OV_PTQ: 45.0}
    ms |= {deploy.NNCF_QAT: 41.0, deploy.OURS_OV: 50.0, deploy.OURS_ORT: 42.0, deploy.OV_FP32: 90.0}
    figures = deploy.aims(scores, {"8x128": ms, "1x128": ms})
    assert figures["qat_row"] == deploy.OURS_ORT  # one artefact for the speed and the accuracy figures
    assert figures["best_ptq_row"] == deploy.OV_PTQ and figures["fastest_ptq_row"] == deploy.ORT_DYNAMIC
    assert figures["qat_speed_vs_best_ptq"] == round(40.0 / 42.0, 3)
    assert figures["qat_minus_best_ptq"] == pytest.approx(0.9)
    assert figures["qat_minus_fp32"] == pytest.approx(-0.5)
    assert figures["qat_minus_nncf_qat"] == pytest.approx(0.3)
    assert "structured_speedup_torch" not in figures  # no structured run given

    ms |= {deploy.STRUCTURED_TORCH: 62.5, deploy.STRUCTURED_OV: 50.0}
    figures = deploy.aims(scores, {"8x128": ms, "1x128": ms})
    assert figures["structured_speedup_torch"] == 1.6 and figures["structured_speedup_openvino"] == 1.8
