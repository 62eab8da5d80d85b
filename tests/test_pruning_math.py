"""Pruning math without a Trainer: schedules against the Zhu & Gupta formula, exact-sparsity masks."""

from __future__ import annotations

import pytest
import torch

from lightning_memopt.pruning import SparsitySchedule, global_masks, layerwise_masks, mask_sparsity, sparsity_at


def zhu_gupta(t: int, s_i: float, s_f: float, t0: int, n: int, dt: int) -> float:
    """The paper's formula, written out independently: sparsity holds between updates every dt steps."""
    if t < t0:
        return 0.0
    t_update = min(t0 + ((t - t0) // dt) * dt, t0 + n * dt)
    return s_f + (s_i - s_f) * (1 - (t_update - t0) / (n * dt)) ** 3


def test_cubic_matches_the_paper() -> None:
    run = SparsitySchedule(final_sparsity=0.9, initial_sparsity=0.1, start=20, end=220, every=25).resolve(300)
    for step in range(0, 300):
        assert sparsity_at(step, run) == pytest.approx(zhu_gupta(step, 0.1, 0.9, 20, 8, 25)), step
    assert sparsity_at(220, run) == 0.9 and sparsity_at(299, run) == 0.9


def test_fractions_of_the_run_and_other_kinds() -> None:
    run = SparsitySchedule(final_sparsity=0.5, kind="linear", start=0.1, end=0.5, every=0.1).resolve(1000)
    assert (run.start_step, run.end_step, run.every_steps) == (100, 500, 100)
    assert [sparsity_at(t, run) for t in (99, 100, 199, 200, 450, 500)] == [0.0, 0.0, 0.0, 0.125, 0.375, 0.5]
    constant = SparsitySchedule(final_sparsity=0.3, kind="constant", start=10).resolve(50)
    assert [sparsity_at(t, constant) for t in (9, 10, 49)] == [0.0, 0.3, 0.3]


@pytest.mark.parametrize(
    ("options", "total", "message"),
    [
        ({"final_sparsity": 1.5}, 100, r"final_sparsity must be in \[0, 1\)"),
        ({"final_sparsity": -0.1}, 100, r"final_sparsity must be in \[0, 1\)"),
        ({"final_sparsity": 0.5, "initial_sparsity": 0.6}, 100, "sparsity only grows"),
        ({"final_sparsity": 0.5, "kind": "exponential"}, 100, "Unknown schedule kind 'exponential'"),
        ({"final_sparsity": 0.5, "start": 50, "end": 40}, 100, "not after its start"),
        ({"final_sparsity": 0.5, "start": 10, "end": 400}, 100, "the run has only 100 optimizer steps"),
        ({"final_sparsity": 0.5, "end": 1.5}, 100, "float above 1"),
    ],
)
def test_bad_schedules_are_refused(options: dict, total: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SparsitySchedule(**options).resolve(total)


def test_masks_reach_the_exact_sparsity() -> None:
    torch.manual_seed(0)
    scores = {"big": torch.randn(64, 48).abs(), "small": torch.randn(10, 7).abs() * 0.1}
    for sparsity in (0.0, 0.25, 0.5, 0.9):
        layer = layerwise_masks(scores, sparsity)
        for name, mask in layer.items():
            assert int((~mask).sum()) == round(sparsity * scores[name].numel())
            if sparsity > 0:
                assert scores[name][~mask].max() <= scores[name][mask].min()  # the lowest scores go
        assert mask_sparsity(global_masks(scores, sparsity)) == pytest.approx(round(sparsity * 3142) / 3142)
    globally = global_masks(scores, 0.5)
    assert mask_sparsity({"small": globally["small"]}) > 0.9  # the low-magnitude layer is pruned hardest


def test_ties_are_broken_deterministically() -> None:
    scores = {"flat": torch.zeros(10)}
    assert layerwise_masks(scores, 0.3)["flat"].tolist() == [False] * 3 + [True] * 7
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
        layerwise_masks(scores, 1.0)


def test_sparse_format_round_trip_and_size(tmp_path) -> None:
    from lightning_memopt.core.sparse_format import load_sparse, pack_bits, save_sparse, unpack_bits

    mask = torch.rand(13) > 0.5
    assert torch.equal(unpack_bits(pack_bits(mask), 13), mask)
    torch.manual_seed(0)
    weight = torch.randn(384, 1536)
    masks = layerwise_masks({"w": weight.abs()}, 0.8)
    state = {"encoder.w": weight * masks["w"], "encoder.bias": torch.randn(1536), "ids": torch.arange(5)}
    report = save_sparse(state, tmp_path / "m.safetensors")
    assert report.packed == ["encoder.w"]
    restored = load_sparse(tmp_path / "m.safetensors")
    assert set(restored) == set(state)
    assert all(torch.equal(restored[k], v) for k, v in state.items())
    expected = (0.2 * 4 + 1 / 8) / 4  # values + 1 bit per weight, over float32
    assert report.ratio == pytest.approx(expected, abs=0.01)
