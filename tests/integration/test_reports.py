"""What a person reads: `--report` pages (eval, plan, a finished job) rendered by a real headless
browser (Debian's chromium), each saved as a screenshot in the tests' artifacts and its text checked;
`plan`'s answer in sections on the terminal; `run`'s console keeping to the milestones."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest

from reembed.cli import main
from support.database import fetch, make_table, one
from support.models import distilled_minilm, embed_column, paragraphs
from support.processes import cli_run_args, events, spawn

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
          "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars")


@pytest.fixture(scope="session")
def distilled() -> Path:
    cache = Path(os.environ.get("REEMBED_TEST_CACHE", Path.home() / ".cache" / "reembed-tests"))
    cache.mkdir(parents=True, exist_ok=True)
    return distilled_minilm(cache, dims=64)


@pytest.fixture
def artifacts(tmp_path: Path, request: pytest.FixtureRequest) -> Path:
    """Where a test's screenshots go: $REEMBED_TEST_ARTIFACTS/<test>, else the test's tmp_path."""
    root = os.environ.get("REEMBED_TEST_ARTIFACTS")
    path = Path(root) / request.node.name if root else tmp_path / "artifacts"
    path.mkdir(parents=True, exist_ok=True)
    return path


def rendered(page: Path, artifacts: Path, *, height: int = 2600) -> str:
    """The page as chromium renders it, offline: a screenshot saved beside the test's artifacts
    (printed), and the text of the DOM it built."""
    assert Path(CHROMIUM).exists(), "chromium is not installed (.ci/run installs it: apt-get install chromium)"
    html = page.read_text()
    assert "<script" not in html and not re.search(r'\b(?:src|href)="', html), "the report loads something"
    assert not re.search(r"https?://(?!www\.w3\.org/2000/svg)", html), "the report names a network address"
    shot = artifacts / (page.stem + ".png")
    with tempfile.TemporaryDirectory(prefix="reembed-chromium-") as profile:
        common = [CHROMIUM, *_FLAGS, f"--user-data-dir={profile}", f"--window-size=1200,{height}"]
        subprocess.run([*common, f"--screenshot={shot}", page.as_uri()], check=True, capture_output=True, timeout=120)
        dom = subprocess.run([*common, "--dump-dom", page.as_uri()], check=True, capture_output=True, text=True,
                             timeout=120).stdout
    assert shot.exists() and shot.stat().st_size > 10_000, f"no screenshot at {shot}"
    print(f"\n[report] {page} rendered by chromium: screenshot {shot}")
    text = re.sub(r"<[^>]+>", " ", dom)
    return re.sub(r"\s+", " ", text.replace("&amp;", "&").replace("&#x27;", "'"))


def cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


@pytest.mark.model
def test_eval_report_is_one_page_chromium_renders_offline_with_the_comparison(
    dsn: str, distilled: Path, static_model_dir: Any, artifacts: Path
) -> None:
    texts = paragraphs(300, seed=4)
    make_table(dsn, rows=len(texts), old_dim=64, content=lambda i: texts[i])
    embed_column(dsn, distilled)
    random48 = static_model_dir(48)
    page = artifacts / "eval-report.html"
    code, out, err = cli("eval", "--dsn", dsn, "--model", str(distilled), "--model", str(random48), "--sample", "300",
                         "--queries", "300", "--device", "cpu", "--report", str(page), "--log-level", "warning")
    assert code == 0, err
    text = rendered(page, artifacts)
    for said in ("reembed eval", "Quality on your rows", "recall@10", "overlap@10", "Cost on this host",
                 "encode rate", "peak memory", "re-embed time", "Recommended", random48.name, distilled.name):
        assert said in text, (said, text[:2000])
    assert "worse" in text  # a random model against the stored column: significantly worse, and said so
    assert "Recommended: no change" in text


def test_plan_report_and_terminal_answer_in_sections_a_person_scans(dsn: str, model48: Path, artifacts: Path) -> None:
    make_table(dsn, rows=300, old_dim=32)
    page = artifacts / "plan-report.html"
    code, out, err = cli("plan", "--dsn", dsn, "--model", str(model48), "--report", str(page), "--log-level", "warning")
    assert code == 0, err
    lines = out.splitlines()
    print("\n" + out)
    assert lines[0].startswith('plan: re-embed "public"."knowledge_nodes".embedding with ')  # then the model
    headings = [line for line in lines if line and not line.startswith(" ")][1:]
    assert headings == ["What will happen", "What it costs", "What it risks", "What is recommended"]
    assert "  column      vector(32) becomes vector(48): the typmod changes" in lines
    assert any(line.startswith("  in_place    search unavailable for about") for line in lines)
    assert any(line.startswith("  shadow      search never unavailable") for line in lines)
    assert lines[-1].startswith("  Recommended: --strategy shadow (")
    assert max(len(line) for line in lines) <= 110
    text = rendered(page, artifacts)
    for said in ("reembed plan", "What will happen", "What it costs", "What it risks", "search unavailable",
                 "extra disk", "Recommended: --strategy shadow"):
        assert said in text, (said, text[:2000])


def test_status_report_of_a_finished_job_plots_its_rate_phases_throttle_hold_and_gate(
    dsn: str, distilled: Path, static_model_dir: Any, workdir: Path, artifacts: Path
) -> None:
    texts = paragraphs(1200, seed=8)
    old = static_model_dir(32)
    make_table(dsn, rows=len(texts), old_dim=32, content=lambda i: texts[i])
    embed_column(dsn, old)
    flag = workdir / "hold"
    flag.write_text("the operator holds the job\n")
    log = workdir / "run.log"
    proc = spawn(cli_run_args(dsn, distilled, "--strategy", "shadow", "--old-model", str(old), "--old-model-name",
                              str(old), "--throttle-flag-file", str(flag), "--max-rate", "60", "--gate-min-recall", "0",
                              "--gate-max-regression", "1", "--gate-min-self-recall", "0"), cwd=workdir, log=log)
    try:
        _until(lambda: events(log, "throttled"), what="the job held by the flag file", proc=proc, log=log)
        _until(lambda: _history(dsn) and any(h["held"] for h in _history(dsn)), what="the hold in the history",
               proc=proc, log=log)
        flag.unlink()
        assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    history = _history(dsn)
    assert history[0]["rows"] == 0 and history[-1]["state"] == "done" and history[-1]["rows"] == len(texts)
    assert [h["t"] for h in history] == sorted(h["t"] for h in history)
    assert any(h["held"] for h in history) and not history[-1]["held"]
    assert sum(h["state"] == "embedding" for h in history) >= 3, history  # heartbeats during the backfill
    page = artifacts / "job-report.html"
    code, out, err = cli("status", "--dsn", dsn, "--report", str(page))
    assert code == 0, err
    assert "history" not in json.loads(cli("status", "--dsn", dsn, "--json")[1])  # --json stays small
    text = rendered(page, artifacts, height=3000)
    for said in ("reembed job", "done", "Progress and rate over time", "rows done", "rows/s", "backfill",
                 "throttle hold from", "writers held", "The quality gate", "before (old model, old column)",
                 "after (new model)", "self-recall@10 through", "passed"):
        assert said in text, (said, text[:3000])


def _history(dsn: str) -> list[dict[str, Any]]:
    try:
        rows = fetch(dsn, "SELECT history FROM reembed_checkpoint ORDER BY job_id DESC LIMIT 1")
    except Exception:  # noqa: BLE001 - the job's tables are not there yet
        return []
    return list(rows[0]["history"]) if rows else []


def _until(predicate: Any, *, what: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 300) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended ({proc.returncode}) before {what}: {log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.2)


def test_run_on_a_terminal_shows_milestones_and_its_json_logs_keep_the_machine_detail(
    dsn: str, second_dsn: str, model48: Path, workdir: Path
) -> None:
    for where in (dsn, second_dsn):
        make_table(where, rows=120, old_dim=32)
    args = cli_run_args(dsn, model48)
    args[args.index("--log-format") + 1] = "console"  # as on a terminal (stderr here is a pipe)
    console = subprocess.run([*_python_cli(), *args], cwd=workdir, capture_output=True, text=True, timeout=300,
                             env=_env())
    assert console.returncode == 0, console.stderr[-3000:]
    for milestone in ("job_started", "embedding_complete", "job_done"):
        assert milestone in console.stderr, console.stderr
    for detail in ("fast_feed", "model_loaded", "tokenizers_sized", "range_complete", "=None"):
        assert detail not in console.stderr, console.stderr
    assert len(console.stderr.splitlines()) <= 12, console.stderr  # the milestones, not twenty lines of detail
    log = workdir / "json.log"
    assert spawn(cli_run_args(second_dsn, model48), cwd=workdir, log=log).wait(timeout=300) == 0
    assert events(log, "model_loaded") and events(log, "range_complete") and events(log, "job_done")
    assert one(second_dsn, "SELECT state FROM reembed_checkpoint") == "done"


def _python_cli() -> list[str]:
    import sys

    return [sys.executable, "-m", "reembed"]


def _env() -> dict[str, str]:
    from support.processes import cli_env

    return cli_env()
