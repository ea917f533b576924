"""`plan` says what the job will cost the server before it starts: the WAL it writes (checked
here against the WAL the run then wrote, pg_current_wal_lsn before and after), the extra disk,
and the dead rows left behind."""

from __future__ import annotations

import psycopg
import pytest

from reembed.job import run
from support.database import make_table, snapshot
from support.fakes import HashEmbedder, job_settings


def _wal_of(dsn: str, fn: object) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CHECKPOINT")  # as a job starts on a server: some time after a checkpoint
        before = conn.execute("SELECT pg_current_wal_lsn()").fetchone()[0]
    fn()  # type: ignore[operator]
    with psycopg.connect(dsn, autocommit=True) as conn:
        return int(conn.execute("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), %s)", (before,)).fetchone()[0])


@pytest.mark.parametrize(("id_type", "old_dim", "new_dim"), [("bigint", 384, 384), ("uuid", 384, 384),
                                                             ("bigint", 64, 384), ("bigint", 384, 768)])
def test_plan_states_the_wal_within_30_percent_of_what_the_run_writes(
    dsn: str, id_type: str, old_dim: int, new_dim: int
) -> None:
    make_table(dsn, rows=4000, id_type=id_type, old_dim=old_dim)
    before = snapshot(dsn)
    planned = run(job_settings(dsn, batch_size=200, dry_run=True), embedder=HashEmbedder(new_dim)).as_dict()
    assert snapshot(dsn) == before  # plan writes nothing
    cost = planned["cost"]
    assert "\n  WAL         about " in planned["message"] and "\n  disk        extra disk up to " in planned["message"]
    written = _wal_of(dsn, lambda: run(job_settings(dsn, batch_size=200), embedder=HashEmbedder(new_dim)))
    print(f"\nWAL {id_type} {old_dim}->{new_dim}: estimated {cost['wal_bytes']}, written {written}, "
          f"ratio {cost['wal_bytes'] / written:.3f}")
    assert 0.7 <= cost["wal_bytes"] / written <= 1.3, (cost, written)
    assert cost["extra_disk_bytes"] > 0
    if old_dim == new_dim:  # no rewrite: every old row version is left dead for VACUUM
        assert cost["bloat_bytes"] > 0 and "dead row versions left for VACUUM" in planned["message"]
    else:
        assert cost["bloat_bytes"] == 0 and cost["wal_finalize_bytes"] > 0
