"""Partitioned tables' pure parts: a foreign partition refused before any write, the partitions
attached and detached found by identity, what a job records of them, the names a shadow job gives
each partition's index, and the finalize steps a partitioned index takes."""

from __future__ import annotations

from typing import Any

import pytest

from reembed import partitions
from reembed.dependents import REBUILD, Dependent, child_step_name, index_step_name, parent_step_name, table_state
from reembed.errors import ConfigError
from reembed.partitions import ChildIndex, Partition
from reembed.shadow import PREVIOUS, ShadowChild, name_with
from reembed.target import TableInfo


class _Rows:
    def __init__(self, rows: list[dict[str, Any]]) -> None:
        self.rows = rows

    def fetchall(self) -> list[dict[str, Any]]:
        return self.rows


class _Conn:
    """Answers the partition tree's query with the rows given."""

    def __init__(self, rows: list[dict[str, Any]]) -> None:
        self.rows = rows

    def execute(self, statement: Any, params: Any = None) -> _Rows:
        return _Rows(self.rows)


def _info(partitioned: bool = True) -> TableInfo:
    return TableInfo(qualified='"app"."items"', ident=("app", "items"), oid=1, id_column="id", id_type="bigint",
                     id_type_oid=20, column="embedding", content_column="content", typmod=64, index=None,
                     registry=("embedding_model",), attnum=3, partitioned=partitioned)


def _row(name: str, kind: str = "r", level: int = 1) -> dict[str, Any]:
    return {"oid": hash(name) % 100000, "schema": "app", "name": name, "kind": kind, "level": level,
            "parent_schema": "app", "parent_name": "items", "bound": "FOR VALUES FROM (0) TO (10)", "attnum": 3,
            "rows": 10, "bytes": 8192}


def test_a_foreign_partition_is_refused_before_any_write() -> None:
    conn = _Conn([_row("items_0"), _row("items_remote", kind="f")])
    with pytest.raises(ConfigError, match=r"foreign tables as partitions \(app.items_remote\).*nothing was written"):
        partitions.tree(conn, _info())  # type: ignore[arg-type]  # a fake connection: rows only


def test_a_plain_table_has_no_partitions_and_asks_nothing() -> None:
    assert partitions.tree(None, _info(partitioned=False)) == []  # type: ignore[arg-type]  # never used


def test_partitions_attached_and_detached_are_found_by_identity_not_by_name() -> None:
    a, b = Partition(1, "app", "items_0", "r", 1, ("app", "items"), "", 3), Partition(
        2, "app", "items_1", "r", 1, ("app", "items"), "", 3)
    again = Partition(3, "app", "items_1", "r", 1, ("app", "items"), "", 3)  # detached, another attached as it
    added, gone = partitions.changes([a, b], [a, again])
    assert added == [again] and gone == [b]
    assert Partition.from_json(again.as_json()) == again


def test_a_child_index_round_trips_through_the_job_row() -> None:
    c = ChildIndex(("app", "items_0"), "items_0_search", ("app", "items_hnsw"), True, "hnsw (embedding x)", 1,
                   {"comment": "c"}, "hnsw (embedding x)")
    assert ChildIndex.from_json(c.as_json()) == c


def test_a_shadow_job_names_each_partitions_twin_within_63_bytes_and_under_the_twin_parent() -> None:
    long = "items_partition_for_the_month_of_january_2026_embedding_idx_x"  # 61 bytes
    c = ChildIndex(("app", "items_2026_01"), long, ("app", "items_embedding_hnsw"), True,
                   "hnsw (embedding vector_cosine_ops)")
    s = ShadowChild.of(c, "_reembed7", "embedding", "embedding_reembed7")
    assert s.twin.name == name_with(long, "_reembed7") and len(s.twin.name.encode()) <= 63
    assert s.twin.parent == ("app", "items_embedding_hnsw_reembed7")
    assert s.twin.body == 'hnsw ("embedding_reembed7" vector_cosine_ops)'
    assert s.previous == name_with(long, PREVIOUS) and s.previous != s.twin.name


def test_an_in_place_jobs_state_says_how_many_partitions_indexes_are_built() -> None:
    children = [ChildIndex(("app", f"items_{i}"), f"items_{i}_idx", ("app", "h"), True, "hnsw (e)").as_json()
                for i in range(3)]
    index = Dependent("index", "h", REBUILD, definition="CREATE INDEX h ON ONLY app.items USING hnsw (e)",
                      method="hnsw", children=children)
    leaf = ChildIndex.from_json(children[0])

    class Job:
        dependents = [index.as_json()]
        index_name, index_def, index_dropped, state, strategy = None, None, True, "finalizing", "in_place"
        finalize_steps = ["catch_up", "cut_over", parent_step_name("h"), child_step_name("h", leaf)]
        source_typmod, target_dimension = 64, 48

    said = table_state(Job())  # type: ignore[arg-type]  # the fields a job row has
    assert said is not None and "index h dropped" in said and "h built again on 1 of its 3 partitions" in said
    assert index_step_name("h", only=True) == "build_index"
