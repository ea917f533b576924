"""The bridge's map (reembed.mapping) on synthetic pairs whose true map is known."""

from __future__ import annotations

import numpy as np
import pytest

from reembed import mapping
from reembed.errors import ConfigError


def pairs(n: int, new_dim: int, old_dim: int, *, noise: float = 0.0, seed: int = 0,
          rotation: bool = False) -> tuple[mapping.Pairs, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    new = rng.standard_normal((n, new_dim))
    if rotation:
        weight, _ = np.linalg.qr(rng.standard_normal((new_dim, old_dim)))
        bias = np.zeros(old_dim)
    else:
        weight, bias = rng.standard_normal((new_dim, old_dim)) / np.sqrt(new_dim), rng.standard_normal(old_dim)
    old = new @ weight + bias + noise * rng.standard_normal((n, old_dim))
    return mapping.Pairs(new.astype(np.float32), old.astype(np.float32)), weight, bias


def test_ridge_recovers_a_known_affine_map_into_a_smaller_space() -> None:
    made, weight, bias = pairs(2000, 48, 16)
    fitted = mapping.ridge(made, 1e-6, normalize=False)
    assert np.allclose(fitted.weight, weight, atol=1e-3) and np.allclose(fitted.bias, bias, atol=1e-3)


def test_procrustes_recovers_a_rotation_between_spaces_of_one_dimension() -> None:
    made, rotation, _ = pairs(1000, 24, 24, rotation=True)
    unit = mapping.Pairs(mapping.unit(made.new.astype(np.float64)), mapping.unit(made.old.astype(np.float64)))
    fitted = mapping.procrustes(unit, normalize=True)
    assert np.allclose(fitted.weight, rotation, atol=0.05)
    assert mapping.self_recall(fitted, unit) == 1.0


def test_the_fit_measures_on_rows_it_never_saw_and_finds_them_through_a_good_map() -> None:
    made, _, _ = pairs(600, 32, 16, noise=0.05)
    fitted = mapping.fit(made, held_out=0.25, seed=3)
    f = fitted.figures
    assert f["held_out"] == 150 and f["train"] == 450 and len(fitted.held) == 150
    assert set(f["validation"]) == {"judged_by", "ridge", "ridge+nce"}  # no Procrustes between unequal dimensions
    assert f["validation"]["judged_by"] == "rows found themselves"
    assert f["self_recall"] >= 0.95 and f["recall_vs_old"] >= 0.8, f
    again = mapping.fit(made, held_out=0.25, seed=3)
    assert np.array_equal(again.map.weight, fitted.map.weight) and again.figures["kind"] == f["kind"]  # seeded


def test_a_map_between_unrelated_spaces_measures_near_nothing() -> None:
    rng = np.random.default_rng(1)
    made = mapping.Pairs(rng.standard_normal((400, 16)).astype(np.float32),
                         rng.standard_normal((400, 16)).astype(np.float32))
    f = mapping.fit(made).figures
    assert "procrustes" in f["validation"]
    assert f["self_recall"] < 0.3 and f["recall_vs_old"] < 0.3, f


def test_unit_old_vectors_give_a_map_whose_output_is_unit_length() -> None:
    made, _, _ = pairs(300, 24, 12, noise=0.1)
    unit = mapping.Pairs(made.new, mapping.unit(made.old.astype(np.float64)).astype(np.float32))
    fitted = mapping.fit(unit, refine=False)
    assert fitted.map.normalize and fitted.figures["normalize"]
    assert np.allclose(np.linalg.norm(fitted.map.apply(made.new[:5]), axis=1), 1.0)


def test_fragments_are_asked_for_the_training_rows_only_and_fitted_beside_them() -> None:
    made, _, _ = pairs(500, 24, 12, noise=0.05)
    asked: list[np.ndarray] = []

    def fragments(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        asked.append(rows)
        return rows[::2], made.new[rows[::2]] + 0.01  # one fragment for every other row: near the row itself

    fitted = mapping.fit(made, fragments=fragments)
    assert len(asked) == 1 and not set(asked[0]) & set(fitted.held.tolist())  # the held-out rows get none
    f = fitted.figures
    assert f["validation"]["judged_by"] == "fragments found their row" and "ridge+nce/rows" in f["validation"]
    assert f["self_recall"] >= 0.9
    assert f["fragments"] == (0 if f["kind"] == "ridge+nce/rows" else len(asked[0][::2]))


def test_too_few_pairs_are_refused() -> None:
    made, _, _ = pairs(mapping.MIN_PAIRS - 1, 8, 8)
    with pytest.raises(ConfigError, match="a bridge needs at least"):
        mapping.fit(made)
