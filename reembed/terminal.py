"""What a person reads on the terminal: answers in sections they scan (what will happen, what it
costs, what it risks, what is recommended, as `terraform plan` or `pg_upgrade --check` print
theirs), and tables with aligned columns. Text only, from the plain data the --json object
holds; nothing here reads the database.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from typing import Any

from reembed.cost import size

WIDTH = 110  # wrapped here: readable in an 80-column terminal too (a line or two more)
_LABEL = 12

Section = tuple[str, Sequence[tuple[str, str]]]
PRE = "\0"  # a line's label for text printed as it is (a table's row), never wrapped


def sections(title: str, parts: Sequence[Section]) -> str:
    """A title line, then each section: its heading and its labelled lines, wrapped under the label."""
    out = textwrap.wrap(title, WIDTH, subsequent_indent="  ", break_on_hyphens=False) or [""]
    for heading, lines in parts:
        if not lines:
            continue
        out += ["", heading]
        for label, text in lines:
            if label == PRE:
                out.append("  " + text)
                continue
            first = f"  {label:<{_LABEL}}" if label else "  "
            out += textwrap.wrap(text, WIDTH, initial_indent=first, subsequent_indent=" " * (len(first)),
                                 break_on_hyphens=False) or [first.rstrip()]
    return "\n".join(out)


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], *, right: Sequence[bool] = ()) -> list[str]:
    """Aligned columns, two spaces apart; `right[i]`: column i aligned right (numbers)."""
    widths = [max(len(str(c)) for c in column) for column in zip(headers, *rows, strict=True)]
    flush = [bool(right[i]) if i < len(right) else False for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(str(c).rjust(w) if r else str(c).ljust(w)
                         for c, w, r in zip(cells, widths, flush, strict=True)).rstrip()

    return [line(headers), *(line(r) for r in rows)]


def duration(secs: float | None) -> str:
    """A duration a person reads: 42 s, 3 min 20 s, 5 h 12 min."""
    if secs is None:
        return "?"
    if secs < 90:
        return f"{secs:.0f} s" if secs >= 10 else f"{secs:.1f} s"
    minutes = secs / 60
    if minutes < 90:
        return f"{int(minutes)} min {int(secs % 60)} s"
    return f"{int(minutes // 60)} h {int(minutes % 60)} min"


def plan_text(d: dict[str, Any]) -> str:
    """`reembed plan`'s answer (its --json details) in four sections."""
    target, current = d["target_signature"], d.get("current_signature")
    cost, strategies = d["cost"], d["strategies"]
    title = (f"plan: re-embed {d['table']}.{d.get('column', 'embedding')} with {target['model_name']} "
             f"({target['dimension']}-d); current model: "
             + (f"{current['model_name']} ({current['dimension']}-d)" if current else "none (no registry row)"))
    happen = [("rows", f"{d['rows_to_update']:,} to re-embed in {d['embedder_batches']:,} batches"
               + (f" (resumes job {d['resumes_job']})" if d.get("resumes_job") else ""))]
    kind, was = d.get("column_type", "vector"), d.get("column_typmod")
    happen.append(("column", f"{kind}({was if was else ''}) becomes {kind}({target['dimension']}): the typmod "
                   "changes" if d["would_alter_typmod"] else f"stays {kind}({target['dimension']})"))
    key = d.get("key") or []
    if len(key) > 1:
        happen.append(("key", f"({', '.join(key)}): walked in key order by row comparison, on its index"))
    text = d.get("text") or {}
    if text.get("reads") and text.get("content") not in text["reads"]:  # --content: an expression
        happen.append(("text", f"{text['content']} (capture compares {', '.join(text['reads'])})"))
    if text.get("null_content") == "empty":
        happen.append(("", "a NULL text is encoded as the empty text"))
    if d.get("not_null"):
        happen.append(("NOT NULL", f"{d.get('column', 'the column')} is NOT NULL: kept (in place, PostgreSQL keeps it "
                                   "through the type change; shadow, the new column refuses NULL from the swap on, "
                                   "then one scan validates it with the application writing, no lock held)"))
    if d.get("partitions_said"):
        happen.append(("partitions", d["partitions_said"]))
        if d.get("partition_builds_said"):
            happen.append(("indexes", f"built one partition at a time: {d['partition_builds_said']}"))
        happen.append(("mid-job", d["mid_job"]))
    happen += [("on it" if i == 0 else "", said) for i, said in enumerate(d.get("dependents_said") or [])] \
        or [("on it", "nothing else depends on it")]
    happen.append(("strategy", f"{d['strategy']} (--strategy)"))
    rate = d.get("encode_rows_per_sec_sample")
    costs = [("encoding", f"about {duration(d['estimated_walltime_secs'])}"
              + (f" at {rate:,.0f} rows/s, measured on this host on the table's own rows" if rate else ""))]
    costs += [("WAL", f"about {size(cost['wal_bytes'])} ({size(cost['wal_embed_bytes'])} for the rows, "
                      f"{size(cost['wal_finalize_bytes'])} at finalize)"),
              ("disk", f"extra disk up to {size(cost['extra_disk_bytes'])}; "
                       + (f"{size(cost['bloat_bytes'])} of dead row versions left for VACUUM" if cost["bloat_bytes"]
                          else "no dead row versions left behind (the rewrite compacts the table)"))]
    costs += [("note" if i == 0 else "", note) for i, note in enumerate(cost.get("notes") or [])]
    risks = []
    for name in ("in_place", "shadow"):
        s = strategies[name]
        if s["refused"]:
            risks.append((name, f"refused: {s['refused']}"))
            continue
        down = s["search_unavailable_secs"]
        text = (f"search unavailable for about {duration(down)}" if down else "search never unavailable") + \
            f"; writers held at most {s['writers_held_secs']:g} s; extra disk up to {size(s['extra_disk_bytes'])}"
        if s.get("kept_until_cleanup_bytes"):
            text += f" ({size(s['kept_until_cleanup_bytes'])} kept until `reembed cleanup`)"
        broken = s.get("prepared_statements_broken") or []
        if broken:
            text += f"; prepared statements that fail until prepared again: {' and '.join(broken)}"
        if name == "in_place" and d["would_alter_typmod"] and d.get("cut_over_rewrite_secs"):
            text += (f"; at the cut-over the table is rewritten (vector({target['dimension']})): writers and "
                     f"readers wait about {d['cut_over_rewrite_secs']} s")
        risks.append((name, text))
    chosen = strategies.get("recommended")
    recommended = [("", f"Recommended: --strategy {chosen} ({strategies['why']})" if chosen
                    else f"Recommended: none ({strategies['why']})")]
    return sections(title, [("What will happen", happen), ("What it costs", costs), ("What it risks", risks),
                            ("What is recommended", recommended)])
