"""reembed.quality: the arithmetic behind `reembed eval`'s intervals and verdicts."""

from __future__ import annotations

import numpy as np

from reembed.quality import found, mcnemar, nearest, overlap, paired, wilson


def test_a_difference_of_two_queries_in_200_is_no_significant_difference() -> None:
    rng = np.random.default_rng(0)
    a = rng.random(200) < 0.80
    b = a.copy()
    misses = np.flatnonzero(~b)[:2]
    b[misses] = True  # B finds two more of the same 200 queries: +0.01
    result = paired(a, b)
    assert round(result.difference, 3) == 0.010
    assert result.verdict == "no significant difference" and result.p_value > 0.05
    assert result.low < 0 < result.high


def test_a_large_paired_difference_is_called_better_or_worse() -> None:
    a = np.array([True] * 150 + [False] * 50)
    b = np.array([True] * 190 + [False] * 10)
    assert paired(a, b).verdict == "better" and paired(b, a).verdict == "worse"
    assert paired(a, b).low > 0 and paired(b, a).high < 0


def test_wilson_interval_holds_its_proportion_and_stays_within_zero_and_one() -> None:
    for hits, n in ((0, 20), (20, 20), (160, 200), (1, 3)):
        i = wilson(hits, n)
        assert 0.0 <= i.low <= hits / n <= i.high <= 1.0
    assert wilson(160, 200).high - wilson(160, 200).low > wilson(1600, 2000).high - wilson(1600, 2000).low


def test_wilson_interval_covers_the_true_recall_in_about_95_percent_of_samples() -> None:
    rng = np.random.default_rng(1)
    covered = sum(wilson(int((rng.random(200) < 0.85).sum()), 200).contains(0.85) for _ in range(2000))
    assert 0.92 <= covered / 2000 <= 0.98


def test_mcnemar_is_symmetric_and_one_without_discordant_pairs() -> None:
    assert mcnemar(0, 0) == 1.0
    assert mcnemar(3, 9) == mcnemar(9, 3)
    assert mcnemar(0, 10) < 0.01


def test_nearest_ranks_by_the_indexs_distance_and_leaves_a_row_out_on_request() -> None:
    corpus = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [10.0, 0.0]], dtype=np.float32)
    q = np.array([[1.0, 0.0]], dtype=np.float32)
    assert nearest(corpus, q, k=2, metric="cosine")[0].tolist()[0] in (0, 3)
    assert nearest(corpus, q, k=1, metric="l2")[0].tolist() == [0]
    assert nearest(corpus, q, k=1, metric="ip")[0].tolist() == [3]
    assert 0 not in nearest(corpus, corpus[[0]], k=2, metric="l2", exclude=[0])[0].tolist()


def test_found_counts_a_row_of_the_same_content_and_overlap_is_the_shared_share() -> None:
    top = np.array([[2, 3], [0, 1]])
    assert found(top, [1, 3], ["a", "b", "b", "c"]).tolist() == [True, False]
    assert overlap(np.array([[1, 2, 3, 4]]), np.array([[4, 3, 9, 8]])).tolist() == [0.5]


def _model(label: str, recall: float, *, current: bool = False, verdict: str | None = None, dim: int = 384,
           rate: float = 100.0) -> dict[str, object]:
    m: dict[str, object] = {"label": label, "current": current, "recall": {"value": recall},
                            "self_recall": {"value": 1.0}, "dimension": dim, "bytes_per_vector": 8 + 4 * dim,
                            "rows_per_sec": rate}
    if verdict is not None:
        m["versus"] = {"verdict": verdict, "difference": 0.05, "low": 0.02, "high": 0.08, "p_value": 0.001}
    return m


def test_eval_recommends_a_significantly_better_candidate_and_else_no_change() -> None:
    from reembed.evaluate import recommend

    current = _model("current", 0.80, current=True)
    tied = _model("c", 0.81, verdict="no significant difference")
    better = recommend([current, _model("b", 0.85, verdict="better"), tied], "current")
    assert better["model"] == "b" and better["why"].startswith("recall@10 +0.050")
    tie = recommend([current, _model("c", 0.81, verdict="no significant difference", dim=64)], "current")
    assert tie["model"] is None and "no candidate is significantly better" in tie["why"]
    assert "c is as good" in tie["why"]
    worse = recommend([current, _model("w", 0.60, verdict="worse")], "current")
    assert worse["model"] is None and "every candidate is worse" in worse["why"]


def test_eval_without_the_current_model_picks_the_cheapest_of_the_candidates_tied_with_the_best() -> None:
    from reembed.evaluate import recommend

    best = _model("big", 0.86, dim=768)
    small = _model("small", 0.85, verdict="no significant difference", dim=256)
    worse = _model("bad", 0.70, verdict="worse", dim=64)
    picked = recommend([best, small, worse], "big")
    assert picked["model"] == "small" and "as good as big" in picked["why"] and "--current-model" in picked["why"]
