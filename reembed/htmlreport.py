"""`--report PATH`: one self-contained HTML file for `eval`, `plan` and a job (`status --report`).

Inline CSS and inline SVG (reembed.charts); no script, no external font or stylesheet, nothing
fetched when the file is opened (a mail attachment, an incident ticket, a browser offline). Each
page is built from the same data its --json prints, so the two never disagree; that data is also
embedded at the end of the page, folded.
"""

from __future__ import annotations

import datetime as dt
import html
import json
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from reembed import charts
from reembed.cost import size
from reembed.errors import ConfigError
from reembed.quality import wilson
from reembed.terminal import duration

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;color:#1a202c;margin:0;
background:#f7fafc;line-height:1.45}
main{max-width:1040px;margin:0 auto;padding:24px 32px 48px}
h1{font-size:26px;margin:8px 0 4px}h2{font-size:19px;margin:30px 0 8px;border-bottom:1px solid #e2e8f0;
padding-bottom:4px}
.sub{color:#4a5568;margin:0 0 16px}
.verdict{background:#ebf8ff;border-left:5px solid #2b6cb0;padding:12px 16px;margin:16px 0;font-size:16px}
.verdict.warn{background:#fffaf0;border-color:#c05621}
table{border-collapse:collapse;margin:8px 0 12px;background:#fff;font-size:14px}
th,td{border:1px solid #e2e8f0;padding:5px 10px;text-align:left;vertical-align:top}
th{background:#edf2f7;font-weight:600}td.n{text-align:right;font-variant-numeric:tabular-nums}
dl{display:grid;grid-template-columns:max-content 1fr;gap:4px 18px;margin:8px 0}
dt{color:#4a5568;font-weight:600}dd{margin:0}
figure{margin:10px 0 18px;background:#fff;border:1px solid #e2e8f0;padding:10px;display:inline-block}
figcaption{color:#4a5568;font-size:13px;margin-top:4px;max-width:720px}
details{margin-top:28px}pre{white-space:pre-wrap;font-size:12px;background:#fff;border:1px solid #e2e8f0;padding:10px}
.note{color:#4a5568;font-size:14px}.ft{font-weight:600;font-size:14px;margin:0 0 4px}
"""


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _default(value: object) -> str:
    return value.isoformat() if isinstance(value, (dt.datetime, dt.date)) else str(value)


def page(title: str, subtitle: str, body: Sequence[str], data: dict[str, Any]) -> str:
    folded = _e(json.dumps(data, default=_default, sort_keys=True, indent=1))
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{_e(title)}</title>"
            f"<style>{_CSS}</style></head><body><main><h1>{_e(title)}</h1><p class=\"sub\">{_e(subtitle)}</p>"
            + "".join(body)
            + f"<details><summary>The data of this report (as --json prints it)</summary><pre>{folded}</pre></details>"
            + "</main></body></html>\n")


def write(path: str, text: str) -> Path:
    """The report at `path`, whole or not at all (written beside it, then renamed)."""
    target = Path(path).expanduser()
    if target.is_dir():
        raise ConfigError(f"--report {path} is a directory; give a file name, e.g. {target / 'report.html'}")
    if not target.parent.is_dir():
        raise ConfigError(f"--report {path}: the directory {target.parent} does not exist")
    fd, staging = tempfile.mkstemp(prefix=".reembed-report-", suffix=".html", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(staging, target)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise
    return target


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]], numeric: Sequence[int] = ()) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td class=\"n\">{_e(c)}</td>" if i in numeric else f"<td>{_e(c)}</td>"
                                    for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _dl(items: Sequence[tuple[str, object]]) -> str:
    return "<dl>" + "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in items) + "</dl>"


def _figure(svg: str, caption: str) -> str:
    title = re.search(r"<title>(.*?)</title>", svg)
    head = f'<div class="ft">{title.group(1)}</div>' if title else ""  # already escaped in the SVG
    return f"<figure>{head}{svg}<figcaption>{_e(caption)}</figcaption></figure>"


# ------------------------------------------------------------------------------------ eval


def _name(m: dict[str, Any]) -> str:
    return f"current ({Path(m['signature']['model_name']).name or m['signature']['model_name']})" if m["current"] \
        else str(m["label"])


def _p(value: float) -> str:
    return "p < 0.001" if value < 0.001 else f"p = {value:.3g}"


def _ci(i: dict[str, float] | None) -> str:
    return "not measured" if i is None else f"{i['value']:.3f} [{i['low']:.3f}, {i['high']:.3f}]"


def eval_page(d: dict[str, Any]) -> str:
    s, k = d["sample"], d["k"]
    models = d["models"]
    candidates = [m for m in models if not m["current"]]
    rec = d["recommended"]
    verdict = f"Recommended: {rec['model'] or 'no change'}. {rec['why'][:1].upper()}{rec['why'][1:]}"
    body = [f'<div class="verdict{"" if rec["model"] else " warn"}">{_e(verdict)}</div>',
            "<h2>Quality on your rows</h2>",
            _figure(charts.intervals([(_name(m), *(m["recall"][x] for x in ("value", "low", "high")))
                                      if m["recall"] else (_name(m), float("nan"), 0.0, 0.0) for m in models],
                                     title=f"recall@{k}"),
                    f"recall@{k}: a query made from a row (one of its sentences) finds that row among the "
                    f"{s['rows']:,} sampled rows; the bar is the 95 % interval over the {s['queries']:,} queries. "
                    "Bars that overlap much are not a difference you can count on: see the paired test in the table.")]
    if any(m.get("overlap") for m in candidates):
        body.append(_figure(charts.intervals([(_name(m), m["overlap"]["value"], m["overlap"]["low"],
                                               m["overlap"]["high"]) for m in candidates if m.get("overlap")],
                                             title=f"overlap@{k} with the stored column's neighbours"),
                            f"overlap@{k}: of a row's {k} nearest rows under the candidate, the share that are also "
                            "among its nearest under the stored vectors: how much of today's search results stay."))
    rows = []
    for m in models:
        v = m.get("versus")
        rows.append([_name(m), m["dimension"], _ci(m["recall"]),
                     f"{v['verdict']} ({v['difference']:+.3f} [{v['low']:+.3f}, {v['high']:+.3f}], "
                     f"{_p(v['p_value'])})" if v else "reference" if m["recall"] else "-",
                     f"{m['self_recall']['value']:.3f}", _ci(m.get("overlap")) if not m["current"] else "1"])
    body.append(_table(["model", "dimension", f"recall@{k} [95 % CI]", f"against {d['reference']}",
                        f"self-recall@{k}", f"overlap@{k}"], rows, numeric=(1,)))
    body.append(f"<h2>Cost on this host and for the whole table ({d['rows_total']:,} rows)</h2>")
    body.append(_figure(charts.bars([(m["label"], m["rows_per_sec"], f"{m['rows_per_sec']:,.0f} rows/s")
                                     for m in candidates], title="encode rate"),
                        "Rows per second through the pipeline a run uses, measured on this host's device on the "
                        "sampled rows."))
    body.append(_figure(charts.bars([(m["label"], float(m["plan"]["estimated_walltime_secs"] or 0),
                                      duration(m["plan"]["estimated_walltime_secs"])) for m in candidates],
                                    title="re-embed time"),
                        "The whole table's encoding at that rate, as `reembed plan` states it (finalize comes on "
                        "top)."))
    memory = [m for m in candidates if m.get("peak_memory")]
    body.append(_figure(charts.bars([(m["label"], m["peak_memory"]["bytes"], size(m["peak_memory"]["bytes"]))
                                     for m in memory], title="peak memory"),
                        "Peak memory of loading the model and encoding the sample: "
                        + ", ".join(sorted({"GPU memory allocated (torch)" if m["peak_memory"]["kind"] ==
                                            "cuda_allocated" else "resident memory of this process, sampled"
                                            for m in memory}))))
    body.append(_table(
        ["model", "rows/s here", "peak memory", "bytes a vector", "the column", "re-embed time", "WAL", "extra disk",
         "strategy"],
        [[m["label"], f"{m['rows_per_sec']:,.0f}", size(m["peak_memory"]["bytes"]), f"{m['bytes_per_vector']:,}",
          size(m["table_vector_bytes"]), duration(m["plan"]["estimated_walltime_secs"]),
          size(m["plan"]["cost"]["wal_bytes"]), size(m["plan"]["cost"]["extra_disk_bytes"]), m["plan"]["strategy"]]
         for m in candidates], numeric=(1, 2, 3, 4, 5, 6, 7)))
    notes = [f"{s['rows']:,} rows sampled with seed {s['seed']} ({d['metric']} distance, exact search among them); "
             "on the whole table more rows compete, so every figure is lower there: compare models, not "
             "absolute figures."]
    notes += [f"{m['label']}: {m['note']}" for m in models if m.get("note")]
    if s["left_out"]:
        notes.append(f"{s['left_out']:,} sampled rows without a stored vector were left out.")
    body.append("<h2>Notes</h2>" + "".join(f'<p class="note">{_e(n)}</p>' for n in notes))
    return page(f"reembed eval: {d['table']}.{d['column']}",
                f"{len(candidates)} candidate(s) against the stored column on {s['rows']:,} of the table's "
                f"{d['rows_total']:,} rows, {s['queries']:,} queries; {d['duration_secs']} s", body, d)


# ------------------------------------------------------------------------------------ plan


def plan_page(d: dict[str, Any]) -> str:
    target, current = d["target_signature"], d.get("current_signature")
    cost, strategies = d["cost"], d["strategies"]
    chosen = strategies.get("recommended")
    body = [f'<div class="verdict{"" if chosen else " warn"}">'
            + _e(f"Recommended: --strategy {chosen} ({strategies['why']})" if chosen
                 else f"Recommended: none ({strategies['why']})") + "</div>",
            "<h2>What will happen</h2>",
            _dl([("rows", f"{d['rows_to_update']:,} to re-embed in {d['embedder_batches']:,} batches"),
                 ("model", f"{target['model_name']} ({target['dimension']}-d), now "
                           + (f"{current['model_name']} ({current['dimension']}-d)" if current else "none")),
                 ("column", f"{d.get('column_type', 'vector')}({d.get('column_typmod') or ''}) becomes "
                            f"{d.get('column_type', 'vector')}({target['dimension']}): the typmod changes"
                  if d["would_alter_typmod"] else "same dimension: the type stays"),
                 ("strategy", d["strategy"])]
                + [("on the column", x) for x in d.get("dependents_said") or ["nothing else depends on it"]]),
            "<h2>What it costs</h2>",
            _dl([("encoding", duration(d["estimated_walltime_secs"])
                  + (f" at {d['encode_rows_per_sec_sample']:,.0f} rows/s measured here"
                     if d.get("encode_rows_per_sec_sample") else "")),
                 ("WAL", f"{size(cost['wal_bytes'])} ({size(cost['wal_embed_bytes'])} for the rows, "
                         f"{size(cost['wal_finalize_bytes'])} at finalize)"),
                 ("extra disk", size(cost["extra_disk_bytes"])), ("dead row versions", size(cost["bloat_bytes"]))]
                + [("note", n) for n in cost.get("notes") or []]),
            "<h2>What it risks</h2>"]
    names = [n for n in ("in_place", "shadow") if not strategies[n]["refused"]]
    if names:
        body.append(_figure(charts.bars([(n, strategies[n]["search_unavailable_secs"],
                                          duration(strategies[n]["search_unavailable_secs"])
                                          if strategies[n]["search_unavailable_secs"] else "never")
                                         for n in names], title="search unavailable"),
                            "How long search over the column cannot be served, per strategy."))
        body.append(_figure(charts.bars([(n, strategies[n]["extra_disk_bytes"], size(strategies[n]["extra_disk_bytes"]))
                                         for n in names], title="extra disk"),
                            "Disk needed on top of the table at the peak, per strategy."))
    body.append(_table(["strategy", "search unavailable", "writers held at most", "extra disk", "refused"],
                       [[n, duration(strategies[n]["search_unavailable_secs"])
                         if strategies[n]["search_unavailable_secs"] else "never",
                         f"{strategies[n]['writers_held_secs']:g} s", size(strategies[n]["extra_disk_bytes"]),
                         strategies[n]["refused"] or "no"]
                        for n in ("in_place", "shadow")]))
    return page(f"reembed plan: {d['table']}", f"{target['model_name']} ({target['dimension']}-d); nothing was "
                "written", body, d)


# ------------------------------------------------------------------------------------- job


def _phase(sample: dict[str, Any]) -> str:
    state, step = sample.get("state"), sample.get("step")
    if state == "embedding":
        return "backfill"
    if state == "finalizing":
        return f"finalize, after {step}" if step else "finalize: catch-up"
    return str(state)


def phases(history: Sequence[dict[str, Any]]) -> list[tuple[float, float, str]]:
    """(start, end, phase) from the job's history: consecutive samples of the same phase."""
    out: list[tuple[float, float, str]] = []
    for sample in history:
        t, name = float(sample["t"]), _phase(sample)
        if out and out[-1][2] == name:
            out[-1] = (out[-1][0], t, name)
        else:
            if out:
                out[-1] = (out[-1][0], t, out[-1][2])
            out.append((t, t, name))
    return out


def holds(history: Sequence[dict[str, Any]]) -> list[tuple[float, float]]:
    """(start, end) of each throttle hold in the history."""
    out: list[tuple[float, float]] = []
    start = None
    for sample in history:
        t = float(sample["t"])
        if sample.get("held") and start is None:
            start = t
        elif not sample.get("held") and start is not None:
            out.append((start, t))
            start = None
    if start is not None and history:
        out.append((start, float(history[-1]["t"])))
    return out


def rates(history: Sequence[dict[str, Any]]) -> list[tuple[float, float]]:
    """(time, rows/s) between consecutive samples of the backfill."""
    out = []
    for a, b in zip(history, history[1:], strict=False):
        dt_ = float(b["t"]) - float(a["t"])
        if dt_ > 0 and a.get("state") == "embedding":
            out.append(((float(a["t"]) + float(b["t"])) / 2, max(0.0, (b["rows"] - a["rows"]) / dt_)))
    return out


def job_page(d: dict[str, Any]) -> str:
    if d.get("state") is None:
        raise ConfigError(f"{d['table']}: no re-embed job has run on this table: nothing to report")
    history = d.get("history") or []
    t0 = float(history[0]["t"]) if history else 0.0
    span = (float(history[-1]["t"]) - t0) if history else 0.0
    unit, scale = ("minutes", 60.0) if span > 300 else ("seconds", 1.0)

    def at(t: float) -> float:
        return (t - t0) / scale

    target = d["target"]
    gate = d.get("gate") or {}
    body = [f'<div class="verdict{"" if d["state"] == "done" else " warn"}">'
            + _e(f"Job {d['job_id']}: {d['state']} ({d['phase']}); {d['rows_done']:,} rows re-embedded with "
                 f"{target['model_name']} ({target['dimension']}-d)") + "</div>",
            "<h2>The job</h2>",
            _dl([("table", f"{d['table']}.{d['column']}"), ("strategy", d["strategy"]),
                 ("from", f"{d['source']['model_name']} ({d['source']['dimension']}-d)" if d.get("source") else "none"),
                 ("to", f"{target['model_name']} ({target['dimension']}-d)"),
                 ("rows", f"{d['rows_done']:,} done, {d['rows_skipped']:,} skipped, {d['failed_rows']:,} failed"),
                 ("started", d["started_at"]), ("finished", d.get("finished_at") or "-"),
                 ("throttle", f"held {d.get('throttled_secs') or 0:.1f} s in all"),
                 ("writers held", f"{d['writers_held_secs']:.3f} s at the cut-over"
                  if d.get("writers_held_secs") is not None else "-")])]
    colours = ("#2b6cb0", "#2f855a", "#6b46c1", "#b7791f", "#319795", "#4a5568")
    bands = [(at(a), at(b), f"phase: {name}", colours[i % len(colours)]) for i, (a, b, name) in
             enumerate(phases(history))]
    held = [(at(a), at(b), "held by a throttle", "#e53e3e") for a, b in holds(history)]
    if history:
        body.append("<h2>Progress and rate over time</h2>")
        body.append(_figure(charts.lines([("rows done", [(at(float(h["t"])), float(h["rows"])) for h in history])],
                                         title="rows done", x_label=f"{unit} since the job started",
                                         y_label="rows", bands=bands + held),
                            "Rows done (the job's history: a sample at each heartbeat and at each change of state, "
                            "finalize step and throttle hold). Shaded: the phases; red: throttle holds."))
        rate = rates(history)
        if rate:
            body.append(_figure(charts.lines([("rows/s", [(at(t), r) for t, r in rate])], title="rate",
                                             x_label=f"{unit} since the job started", y_label="rows/s", bands=held),
                                "The backfill's rate between samples; red: throttle holds."))
        body.append(_table(["phase", "from", "to", "lasted"],
                           [[name, f"{at(a):.1f} {unit}", f"{at(b):.1f} {unit}", duration(b - a)]
                            for a, b, name in phases(history)], numeric=(1, 2, 3)))
        if held:
            body.append(_table(["throttle hold from", "to", "lasted"],
                               [[f"{a:.1f} {unit}", f"{b:.1f} {unit}", duration((b - a) * scale)]
                                for a, b, _, _ in held], numeric=(0, 1, 2)))
    else:
        body.append('<p class="note">This job has no recorded history (it ran before reembed recorded one).</p>')
    body.append("<h2>The quality gate</h2>")
    if gate and not gate.get("skipped") and gate.get("recall_new") is not None:
        n = int(gate.get("queries") or 0)
        recall = [("before (old model, old column)", gate.get("recall_old")), ("after (new model)", gate["recall_new"])]
        body.append(_figure(charts.intervals([(label, v, *_wilson(v, n)) if v is not None
                                              else (label, float("nan"), 0.0, 0.0) for label, v in recall],
                                             title="recall@10 before and after"),
                            f"recall@10 of {n} queries made from the table's own rows, through the whole table's "
                            "index; the bar is a 95 % interval. 'before' needs --old-model on the job."))
        body.append(_dl([("verdict", "passed" if gate.get("passed") else "REFUSED"),
                         *[(f"self-recall@10 through {name}", f"{v:.3f}") for name, v in
                           (gate.get("self_recall") or {}).items() if v is not None],
                         *[("failure", f) for f in gate.get("failures") or []]]))
    else:
        body.append('<p class="note">'
                    + _e("skipped (--skip-gate)" if gate.get("skipped") else
                         "no gate: only a shadow job's swap is gated; `reembed eval` measures recall before a job")
                    + "</p>")
    return page(f"reembed job {d['job_id']}: {d['table']}", f"{d['state']}, {d['strategy']}", body, d)


def _wilson(p: float, n: int) -> tuple[float, float]:
    i = wilson(round(p * n), n)
    return i.low, i.high
