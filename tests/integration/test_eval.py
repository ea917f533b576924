"""`reembed eval`: candidate models against the stored column on the table's own rows, with two real
embedding spaces offline (all-MiniLM-L6-v2 and model2vec's distillation of it), on real PostgreSQL."""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path
from typing import Any

import pytest

from reembed.cli import main
from reembed.evaluate import evaluate
from reembed.settings import EvalOptions, ModelSpec, Settings, Target
from support.database import make_table, one, snapshot
from support.models import distilled_minilm, embed_column, embedder, paragraphs
from support.processes import cli_run_args, events, spawn

pytestmark = pytest.mark.model


@pytest.fixture(scope="session")
def distilled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """model2vec's 64-d distillation of all-MiniLM-L6-v2: a second real space (made once into
    $REEMBED_TEST_CACHE, default ~/.cache/reembed-tests: 20 s to 2 min on 2 cores)."""
    cache = Path(os.environ.get("REEMBED_TEST_CACHE", Path.home() / ".cache" / "reembed-tests"))
    cache.mkdir(parents=True, exist_ok=True)
    return distilled_minilm(cache, dims=64)


def embedded_table(dsn: str, texts: list[str], model: Path) -> Any:
    """The design's table (an HNSW index on the column) holding `model`'s vectors of `texts`."""
    make_table(dsn, rows=len(texts), old_dim=embedder(model).signature.dimension, content=lambda i: texts[i])
    return embed_column(dsn, model)


def cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


def _figures(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {("current" if m["current"] else m["label"]): m for m in data["models"]}


@pytest.mark.slow
def test_eval_ranks_two_real_models_as_the_shadow_gate_does_on_the_same_rows_and_writes_nothing(
    dsn: str, minilm_path: Path, distilled: Path, workdir: Path
) -> None:
    texts = paragraphs(400, seed=21)
    embedded_table(dsn, texts, distilled)  # today's column: the distilled model's vectors
    before = snapshot(dsn)
    code, out, err = cli("eval", "--dsn", dsn, "--model", str(minilm_path), "--sample", "400", "--queries", "400",
                         "--device", "cpu", "--json")
    assert code == 0, err[-3000:]
    data = json.loads(out)
    assert snapshot(dsn) == before  # nothing written: the rows, the column, the indexes, the registry
    assert one(dsn, "SELECT count(*) FROM pg_tables WHERE tablename LIKE 'reembed%%'") == 0
    figures = _figures(data)
    current, minilm = figures["current"], figures[minilm_path.name]
    assert data["sample"]["rows"] == 400 and data["sample"]["queries"] >= 350, data["sample"]
    assert current["recall"] is not None, current  # the registry's model was found (its path) and measured
    for m in (current, minilm):
        assert m["recall"]["low"] <= m["recall"]["value"] <= m["recall"]["high"]
    assert minilm["overlap"]["value"] < 1.0 and current["self_recall"]["value"] > 0.9
    assert minilm["rows_per_sec"] > 0 and minilm["peak_memory"]["bytes"] > 0 and minilm["peak_memory"]["kind"] == "rss"
    assert minilm["bytes_per_vector"] == 8 + 4 * 384 and minilm["plan"]["cost"]["wal_bytes"] > 0
    assert minilm["plan"]["estimated_walltime_secs"] > 0
    # The gate of a shadow job on the same rows, the old model given: its recall before and after.
    log = workdir / "run.log"
    proc = spawn(cli_run_args(dsn, minilm_path, "--strategy", "shadow", "--old-model", str(distilled),
                              "--old-model-name", str(distilled), "--gate-queries", "400", "--gate-sample", "400",
                              "--gate-min-recall", "0", "--gate-max-regression", "1"), cwd=workdir, log=log)
    assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
    gate = events(log, "gate_done")[-1]
    print(f"\n[eval] current (distilled) {current['recall']}, minilm {minilm['recall']}, "
          f"versus {minilm['versus']}\n[gate] old {gate['recall_old']:.3f}, new {gate['recall_new']:.3f} "
          f"on {gate['queries']} queries")
    eval_order = minilm["recall"]["value"] > current["recall"]["value"]
    gate_order = gate["recall_new"] > gate["recall_old"]
    assert eval_order == gate_order, (data, gate)
    # the same quantity on the same rows (the whole table is the sample): the gate's figures inside eval's
    # intervals widened by the gate's own sampling of queries (a difference of two estimates)
    for mine, theirs in ((minilm["recall"], gate["recall_new"]), (current["recall"], gate["recall_old"])):
        assert abs(mine["value"] - theirs) <= 1.5 * (mine["high"] - mine["low"]), (mine, theirs)


def test_eval_interval_contains_the_whole_table_figure_in_most_repeated_samples(dsn: str, distilled: Path) -> None:
    texts = paragraphs(1200, seed=5)
    model = embedded_table(dsn, texts, distilled)
    settings = Settings(target=Target(dsn=dsn))

    def measured(**kw: Any) -> dict[str, Any]:
        return evaluate(settings, EvalOptions(**kw), embedders=[model], current=model).as_dict()

    every = _figures(measured(sample=1200, queries=1200, seed=0))["current"]["recall"]["value"]
    inside, seen = 0, []
    for seed in range(1, 11):
        data = measured(sample=1200, queries=150, seed=seed)
        recall = next(m for m in data["models"] if not m["current"])["recall"]
        seen.append((seed, recall["low"], recall["high"]))
        inside += recall["low"] <= every <= recall["high"]
    print(f"\n[eval] the whole table's recall@10 {every:.3f}; 150-query intervals: {seen}")
    assert inside >= 8, (every, seen)  # 10 intervals at 95 %: 8 or more hold it (P(fewer) about 1 %)


def test_eval_refuses_a_model_that_cannot_load_and_a_dimension_the_index_cannot_take_writing_nothing(
    dsn: str, static_model_dir: Any, tmp_path: Path
) -> None:
    make_table(dsn, rows=60, old_dim=48, content=lambda i: f"Row {i} talks about topic {i % 7}. It has two sentences.")
    before = snapshot(dsn)
    code, out, err = cli("eval", "--dsn", dsn, "--model", str(tmp_path / "no-such-model"))
    assert (code, out) == (2, "") and err.startswith("reembed: unknown model") and err.count("\n") == 1, err
    wide = static_model_dir(2048)
    code, out, err = cli("eval", "--dsn", dsn, "--model", str(wide), "--device", "cpu", "--log-level", "warning")
    assert (code, out) == (2, ""), err
    assert err.startswith(f"reembed: --model {wide} (2048-d) cannot replace the column's model") and \
        "takes at most 2000" in err and err.count("\n") == 1, err
    assert snapshot(dsn) == before and not before["tool_tables"]


def test_eval_prints_one_table_a_person_reads_and_says_no_significant_difference_for_a_tie(
    dsn: str, distilled: Path
) -> None:
    texts = paragraphs(200, seed=9)
    embedded_table(dsn, texts, distilled)
    code, out, err = cli("eval", "--dsn", dsn, "--model", str(distilled), "--sample", "200", "--queries", "200",
                         "--device", "cpu", "--log-format", "json")
    assert code == 0, err[-3000:]
    print("\n" + out)
    lines = out.splitlines()
    title = " ".join(out.split("\n\n")[0].split())
    assert title.startswith("eval: ") and "200 rows sampled (seed 0), 200 queries made from them" in title
    headings = [line for line in lines if line and not line.startswith(" ")][1:]
    assert headings == ["Quality on your rows (95 % intervals over the queries)",
                        "Cost on this host and for the whole table (200 rows)", "Notes", "What is recommended"]
    row = next(line for line in lines if line.strip().startswith(distilled.name))
    assert "+0.000 ±0.000: no significant difference" in row  # the same model: a tie, not a win
    assert "Recommended: no change: no candidate is significantly better than the current column" in out
    assert max(len(line) for line in lines) <= 160  # a 160-column terminal shows it unwrapped


@pytest.mark.parametrize("flag", ["--sample", "--queries"])
def test_eval_refuses_a_sample_or_queries_too_small_before_reading_anything(dsn: str, flag: str) -> None:
    code, out, err = cli("eval", "--dsn", dsn, "--model", "m", flag, "0")
    assert (code, out) == (2, "") and err.startswith(f"reembed: {flag} must be"), err


def test_eval_library_refuses_no_candidate(dsn: str) -> None:
    from reembed.errors import ConfigError

    with pytest.raises(ConfigError, match="at least one candidate"):
        evaluate(Settings(target=Target(dsn=dsn)), EvalOptions(models=()))
    assert ModelSpec(model="x").registry_name == "x"
