"""`reembed status`: where the job stands, read from reembed_checkpoint and pg_locks. No writes."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field, replace
from typing import Any

from reembed import bridge, db, dependents, gate, lease
from reembed import checkpoint as ckpt
from reembed.errors import ConfigError
from reembed.queries import query
from reembed.settings import RunOptions, Settings
from reembed.target import regclass_text, split_name


@dataclass
class Status:
    data: dict[str, Any] = field(default_factory=dict)
    exit_code: int = 0

    def as_dict(self) -> dict[str, Any]:
        """What --json prints: everything but the job's history (`status --report` plots that)."""
        out = {k: v for k, v in self.data.items() if k != "history"}
        if "tables" in out:  # a job over several tables: each table's status
            out["tables"] = [{k: v for k, v in t.items() if k != "history"} for t in out["tables"]]
        return out

    def text(self) -> str:
        d = self.data
        if "tables" in d:
            g = d["group"]
            head = (f"job over {len(d['tables'])} tables under one registry"
                    + (f": group {g['id']}, {g['state']}" if g.get("id") is not None else ": no job group yet")
                    + (f"; one {g['one']}" + (f" done, writers held off {g['writers_held_secs']:.3f} s"
                                               if g.get("cut_over_done") and g.get("writers_held_secs") is not None
                                               else " done" if g.get("cut_over_done") else
                                               " when every table is ready") if g.get("id") is not None else ""))
            return "\n\n".join([head, *(Status(t).text() for t in d["tables"])])
        if d.get("state") is None:
            if d.get("group"):
                return (f"{d['table']}.{d['column']}: no job yet; it is one of job group {d['group']['id']} (with "
                        f"{', '.join(d['group']['others'])}), whose next run prepares it; registry: "
                        f"{_sig(d.get('registry'))}")
            return "\n".join([f"{d['table']}: no re-embed job has run on this table; registry: "
                              f"{_sig(d.get('registry'))}", *(f"bridge     {b}" for b in d.get("bridge_said") or [])])
        lines = [
            f"table      {d['table']}.{d['column']}",
            *([f"group      job group {d['group']['id']} with {', '.join(d['group']['others'])}: one "
               f"{d['group']['one']} for all (`reembed status {d['group']['options']}` shows each)"]
              if d.get("group") else []),
            f"job        {d['job_id']}  state {d['state']}"
            + (f"  (finalize steps done: {', '.join(d['finalize_steps']) or 'none'})"
               if d["state"] == "finalizing" else ""),
            f"strategy   {d['strategy']}   phase {d['phase']}",
            f"target     {d['target']['model_name']} ({d['target']['dimension']}-d)   source {_sig(d.get('source'))}",
            f"progress   {d['rows_done']:,} / {d['rows_total'] or 0:,} rows"
            + (f" ({d['percent']:.1f}%)" if d.get("percent") is not None else "")
            + f"  skipped {d['rows_skipped']:,}  failed {d['failed_rows']:,}"
            + (f" (accepted {d['failed_rows_accepted']:,})" if d.get("failed_rows_accepted") else ""),
            f"last id    {d['last_id']}",
            f"rate       {_num(d.get('rows_per_sec'), ' rows/s')}   ETA {_eta(d.get('eta_secs'))}",
        ]
        if d.get("ranges", {}).get("ranges", 0) > 1 or d.get("workers"):
            r = d["ranges"]
            lines.append(f"ranges     {r['ranges']}: {r['done']} done, {r['claimed']} claimed")
        for w in d.get("workers") or []:
            if w["state"] in ("running", "dry", "stale") or d["state"] in ckpt.ACTIVE:
                lines.append(f"worker     {w['host']} pid {w['pid']} {w['device'] or '?'}  {w['state']}"
                             + (f"  range {w['range']} at {w['range_last_id']}" if w["range"] is not None else "")
                             + f"  {w['rows']:,} rows  {_num(w['rows_per_sec'], ' rows/s')}"
                             + f"  heartbeat {_age(w['heartbeat_age_secs'])} ago")
        holder = d.get("holder")
        if holder:
            lines.append(f"holder     {holder['who']}  heartbeat {_age(d.get('heartbeat_age_secs'))} ago")
        elif d["state"] in ckpt.ACTIVE:
            lines.append("holder     none: no run holds the lock; start `reembed run` with the same model to resume")
        if d.get("stale"):
            lines.append(
                f"WARNING    the holder's heartbeat is {_age(d.get('heartbeat_age_secs'))} old: it probably died; "
                "`reembed run --break-stale-lock` takes over"
            )
        capture = d.get("capture")
        if capture:
            on = "capturing" if capture["installed"] else "off"
            still = "; it keeps capturing until the job resumes" if capture["installed"] and not holder else ""
            lines.append(f"capture    {capture['trigger']} ({on}): {capture['pending_changes']:,} changed rows "
                         f"to catch up{still}")
        catch_up = d.get("catch_up")
        if catch_up:
            lines.append(f"catch-up   pass {catch_up['pass']}: {catch_up['keys_done']:,} / {catch_up['keys_total']:,} "
                         f"keys; {catch_up['rows']:,} rows re-embedded by catch-up in all")
        throttle = d.get("throttle")
        if throttle and throttle.get("reason") and holder:
            lines.append(f"throttle   HELD for {_age(throttle.get('held_secs'))}: {throttle['reason']} "
                         f"({throttle['secs_before']:.1f} s held before)")
        elif throttle and throttle.get("secs_before"):
            lines.append(f"throttle   not held; {throttle['secs_before']:.1f} s held in all")
        build = d.get("index_build")
        if build:
            waiting = (f"; waiting for {build['lockers_total'] - build['lockers_done']} older transactions "
                       f"(now backend {build['waiting_for_pid']})" if build.get("waiting_for_pid") else "")
            lines.append(f"index      building {build['index']}: {build['phase']}{waiting}; running "
                         f"{_age(build.get('running_secs'))}")
        if d.get("writers_held_secs") is not None:
            lines.append(f"cut-over   writers held off {d['writers_held_secs']:.3f} s")
        if d.get("gate"):
            verdict = "skipped" if d["gate"].get("skipped") else ("passed" if d["gate"].get("passed") else "REFUSED")
            lines.append(f"gate       {verdict}: {gate.said(d['gate'])}"
                         + (f"; {'; '.join(d['gate']['failures'])}" if d["gate"].get("failures") else ""))
        previous = d.get("previous")
        if previous and previous["state"] == "kept":
            lines.append(f"previous   {previous['column']} kept: {previous['stale_rows']:,} rows written since the "
                         "swap (`reembed rollback` swaps it back, `reembed cleanup` drops it)")
        elif previous:
            lines.append(f"previous   {previous['column']} {previous['state'].replace('_', ' ')}")
        for line in d.get("bridge_said") or []:
            lines.append(f"bridge     {line}")
        if d.get("table_state"):
            lines.append(f"table now  {d['table_state']}")
        if d.get("last_error"):
            lines.append(f"last error {d['last_error']}")
        lines.append(f"started    {d['started_at']}   updated {d['updated_at']}")
        return "\n".join(lines)


def _bridges(conn: Any, table: str, column: str) -> dict[str, Any]:
    """The table's bridges (reembed.bridge): those the application calls, and a newer refusal."""
    found = bridge.current(conn, table, column)
    newest = bridge.latest(conn, table, column)
    if newest is not None and newest.state == "refused" and all(b.bridge_id < newest.bridge_id for b in found):
        found = [*found, newest]
    return {"bridges": [{"function": b.called, "state": b.state, "source": b.source.as_dict(),
                         "target": b.target.as_dict(), "kind": b.kind, "figures": b.figures,
                         "job_id": b.job_id, "created_at": b.created_at} for b in found],
            "bridge_said": [bridge.said(b) for b in found]}


def _sig(sig: dict[str, Any] | None) -> str:
    return f"{sig['model_name']} ({sig['dimension']}-d)" if sig else "none"


def phase(job: ckpt.Job) -> str:
    """Where the job is: backfill, catch-up, index, gate, swap (cut-over), then done; a shadow
    job after its swap: previous kept, rolled back, or cleaned up."""
    steps = job.steps
    if job.state == "embedding":
        return "backfill"
    if job.state == "finalizing":
        if "cut_over" in steps:
            return "index" if job.strategy == "in_place" else "swapped"
        if job.strategy == "shadow":
            if "gate" in steps:
                return "swap"
            if "check_indexes" in steps:
                return "gate"
            if any(s.startswith("build_index") for s in steps):
                return "index"
        return "catch-up"
    if job.state == "done" and job.previous_state is not None:
        return {"kept": "swapped, previous kept", "rolled_back": "rolled back",
                "cleaned": "swapped, previous cleaned up"}.get(job.previous_state, job.previous_state)
    return job.state


def _num(value: float | None, unit: str) -> str:
    return f"{value:,.1f}{unit}" if value else "-"


def _eta(secs: float | None) -> str:
    if secs is None:
        return "-"
    return str(dt.timedelta(seconds=int(secs)))


def _age(secs: float | None) -> str:
    return "?" if secs is None else str(dt.timedelta(seconds=int(secs)))


PHASES = ("backfill", "catch-up", "index", "gate", "swap", "swapped", "done", "abandoned")


def status(settings: Settings, *, stale_after: float = RunOptions.stale_after) -> Status:
    target = settings.target
    with db.connect(target.conninfo(), role="status", vectors=False, autocommit=True) as conn:
        with db.translated():
            if len(settings.all_targets) > 1:
                return _several(conn, settings, stale_after)
            return status_on(conn, settings, stale_after)


def _several(conn: Any, settings: Settings, stale_after: float) -> Status:
    """Each table's status, and the job group they are in (a job over several tables)."""
    tables = [status_on(conn, replace(settings, target=t, targets=()), stale_after).data
              for t in settings.all_targets]
    ids = {t["group"]["id"] for t in tables if t.get("group")}
    group: dict[str, Any] = {"id": ids.pop() if len(ids) == 1 else None}
    if group["id"] is not None:
        states = [t.get("state") for t in tables]
        group["state"] = ("embedding" if "embedding" in states else "finalizing" if "finalizing" in states
                          else states[0] or "none")
        group["one"] = tables[0]["group"]["one"]
        group["cut_over_done"] = all("cut_over" in (t.get("finalize_steps") or []) or t.get("state") == "done"
                                     for t in tables)
        group["writers_held_secs"] = tables[0].get("writers_held_secs")
        group["tables"] = [f"{t['table']}.{t['column']}" for t in tables]
    return Status({"group": group, "tables": tables})


def status_on(conn: Any, settings: Settings, stale_after: float) -> Status:
    """The status, read on `conn` (reembed.metrics keeps one open)."""
    target = settings.target
    row = conn.execute(query("table_by_name"), {"table": regclass_text(split_name(target.table))}).fetchone()
    if row is None:
        raise ConfigError(f"table {target.table} does not exist; check --table and --dsn")
    table = regclass_text((row["nspname"], row["relname"]))
    data: dict[str, Any] = {"table": table, "column": target.column}
    registry = None
    reg = split_name(target.registry)
    present = conn.execute(query("registry_exists"), {"registry": regclass_text(reg)}).fetchone()
    if present and present["present"]:
        registry = conn.execute(query("read_registry", registry=reg)).fetchone()
    data["registry"] = dict(registry) if registry else None
    data.update(_bridges(conn, table, target.column))
    job = ckpt.latest_job(conn, table, target.column)
    named = ckpt.active_group(conn, table, target.column) if job is None or job.group_id is None else job
    group = named.group if named is not None else None
    if named is not None and group is not None:  # one of a job over several tables (reembed.group)
        data["group"] = {"id": group.id, "one": "swap" if named.strategy == "shadow" else "cut-over",
                         "others": [m.label for m in group.members if m.key != (table, target.column)],
                         "options": group.options()}
    if job is None:
        data["state"] = None
        return Status(data)
    progress = ckpt.progress(conn, job)
    ranges = ckpt.ranges(conn, job)
    failed = conn.execute(query("failed_rows_count"), {"job_id": job.id}).fetchone()
    done = int(progress["rows_done"]) + int(progress["rows_skipped"])
    total = job.rows_total
    workers = ckpt.workers(conn, job)
    live = [w for w in workers if w.state in ("running", "dry") and w.heartbeat_age <= stale_after]
    if live:  # every worker's own rate, summed
        rate: float | None = sum(w.rows_per_sec or 0.0 for w in live)
    else:
        rate = max((r.rows_per_sec or 0.0) for r in ranges) if ranges else None
    counts = ckpt.range_counts(conn, job)
    now = conn.execute(query("server_now")).fetchone()["now"]
    heartbeat_age = (now - job.heartbeat_at).total_seconds() if job.heartbeat_at is not None else None
    holder_row = lease.holder_of(conn, int(row["oid"]))
    holder = None
    if holder_row is not None:
        holder = {
            "who": holder_row["application_name"] or f"backend {holder_row['pid']}",
            "pid": holder_row["pid"],
            "since": holder_row["backend_start"],
        }
    active = job.state in ckpt.ACTIVE
    capture = None
    if job.capture_trigger is not None:
        installed = any(r["trigger_name"].startswith(job.capture_trigger + "_") and r["enabled"]
                        for r in conn.execute(query("capture_triggers"), {"table_oid": int(row["oid"])}).fetchall())
        pending = conn.execute(query("changes_pending"), {"job_id": job.id}).fetchone()["n"]
        capture = {"trigger": job.capture_trigger, "installed": installed, "pending_changes": int(pending)}
    held_secs = round((now - job.throttled_since).total_seconds(), 1) if job.throttled_since is not None else None
    previous = None
    if job.previous_state is not None:
        stale = conn.execute(query("after_swap_count"), {"job_id": job.id}).fetchone()
        previous = {"state": job.previous_state, "column": (job.shadow or {}).get("previous"),
                    "stale_rows": int(stale["n"]) if stale and job.previous_state == "kept" else 0,
                    "swapped_at": job.swapped_at}
    build = conn.execute(query("index_build_progress"), {"table_oid": int(row["oid"])}).fetchone() \
        if job.state == "finalizing" else None
    data.update(
        index_build=dict(build) if build else None,
        strategy=job.strategy,
        phase=phase(job),
        shadow_column=(job.shadow or {}).get("shadow"),
        gate=job.gate,
        previous=previous,
        throttle={"reason": job.throttle_reason, "since": job.throttled_since, "held_secs": held_secs,
                  "secs_before": job.throttled_secs},
        capture=capture,
        catch_up={"pass": job.catchup_pass, "keys_done": job.catchup_pass_done, "keys_total": job.catchup_pass_total,
                  "rows": job.catchup_rows} if job.catchup_pass else None,
        writers_held_secs=job.writers_held_secs,
        job_id=job.id,
        state=job.state,
        target=job.target.as_dict(),
        source=job.source.as_dict() if job.source else None,
        rows_done=int(progress["rows_done"]),
        rows_skipped=int(progress["rows_skipped"]),
        rows_total=total,
        percent=(100.0 * min(done, total) / total) if total else (100.0 if job.state == "done" else None),
        last_id=progress["last_id"],
        rows_per_sec=round(rate, 1) if rate and active else None,
        eta_secs=(max(total - done, 0) / rate) if rate and total and active else None,
        holder=holder,
        ranges=counts,
        workers=[{"worker": w.worker, "host": w.host, "pid": w.pid, "device": w.device, "range": w.range_no,
                  "range_last_id": w.range_last_id, "rows": w.rows_done, "rows_per_sec": w.rows_per_sec,
                  "state": w.state if w.heartbeat_age <= stale_after or w.state not in ("running", "dry")
                  else "stale", "heartbeat_age_secs": round(w.heartbeat_age, 1)} for w in workers],
        heartbeat_at=job.heartbeat_at,
        heartbeat_age_secs=round(heartbeat_age, 1) if heartbeat_age is not None else None,
        stale=bool(active and heartbeat_age is not None and heartbeat_age > stale_after),
        failed_rows=int(failed["pending"]) if failed else 0,
        failed_rows_accepted=int(failed["accepted"]) if failed else 0,
        finalize_steps=job.steps,
        index=job.index_name,
        dependents=job.dependents,
        table_state=dependents.table_state(job),
        last_error=job.last_error,
        started_at=job.started_at,
        updated_at=job.updated_at,
        finished_at=job.finished_at,
        throttled_secs=job.throttled_secs,
        history=job.history or [],
    )
    return Status(data)
