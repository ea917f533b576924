"""`reembed verify`: do the stored vectors really hold the registry's model? No writes.

A sample of rows (a fixed seed, so two runs look at the same rows) is encoded again with the
model the operator gives, which must be the one the registry names (its files and options hash
to the registry's hash), and each stored vector is compared with the fresh encoding of the
row's content. A row is wrong when its vector is NULL for content that is not (unless a
finished job left it NULL with --accept-failed), present for NULL content, of another
dimension than the registry's, zero or not finite, or when its cosine to the fresh encoding
is under --min-cosine. Beside the rows: what a job of ours left behind (a capture trigger, a
function, captured keys nobody will catch up) and the objects a dimension change would refuse
(shown, not counted as wrong). Exit 0 when every row agrees and nothing of ours is left
behind, 1 otherwise; a job still running is said, and its rewritten rows are wrong.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import psycopg
import structlog

from reembed import capture, db, dependents
from reembed import checkpoint as ckpt
from reembed.embedder import SentenceTransformerEmbedder, fingerprint
from reembed.encoding import Embedder
from reembed.errors import EXIT_FAILED, EXIT_OK, ConfigError
from reembed.plan import estimate_rows
from reembed.queries import query
from reembed.settings import Settings, VerifyOptions
from reembed.signature import Signature
from reembed.target import TableInfo, inspect_target, read_registry

log = structlog.get_logger()

NAMED = 20  # wrong rows named on the text line; --json names up to 1,000
_JSON_NAMED = 1000
_PAGE = 1000
WRONG = ("disagree", "null_vector", "vector_without_content", "wrong_dimension", "not_finite", "zero")


@dataclass
class Verdict:
    data: dict[str, Any] = field(default_factory=dict)
    exit_code: int = EXIT_OK

    def as_dict(self) -> dict[str, Any]:
        return self.data

    def text(self) -> str:
        d = self.data
        counts = d["counts"]
        wrong = sum(counts[k] for k in WRONG)
        head = (f"verify {d['table']}.{d['column']} against {d['registry']['model_name']} "
                f"({d['registry']['dimension']}-d): {d['rows_checked']:,} rows checked"
                + (" (every row)" if d["every_row"] else f" (sample, seed {d['seed']})")
                + f", {counts['agree']:,} agree, {wrong:,} wrong, {counts['null_content']:,} without content")
        lines = [head]
        if counts["accepted_null"]:
            lines.append(f"  {counts['accepted_null']:,} rows left NULL by a job's --accept-failed (not counted)")
        for kind in WRONG:
            if counts[kind]:
                ids = d["wrong"][kind]
                more = f" (+{counts[kind] - NAMED:,} more)" if counts[kind] > NAMED else ""
                lines.append(f"  {kind.replace('_', ' ')}: {counts[kind]:,}: {', '.join(ids[:NAMED])}{more}")
        if d["cosine"]["min"] is not None:
            lines.append(f"  cosine to a fresh encoding: min {d['cosine']['min']:.5f}, "
                         f"median {d['cosine']['median']:.5f} (threshold {d['min_cosine']})")
        if d.get("column_dimension") not in (None, d["registry"]["dimension"]):
            lines.append(f"  the column is {d['column_type']}({d['column_dimension']}) but the registry says "
                         f"{d['registry']['dimension']}")
        job = d.get("active_job")
        if job:
            lines.append(f"  job {job['job_id']} is {job['state']} with {job['target']} ({job['rows_done']:,} rows "
                         "done): until its cut-over the rows it re-embedded hold another model's vectors")
        for item in d["left_behind"]:
            lines.append(f"  left behind: {item}")
        if d["would_refuse"]:
            lines.append(f"  a dimension change would refuse: {d['would_refuse']}")
        lines.append("OK: every stored vector checked is the registry's model's" if self.exit_code == EXIT_OK
                     else "NOT OK: see above; `reembed run` with the registry's model re-embeds the table")
        return "\n".join(lines)


def verify(settings: Settings, options: VerifyOptions, *, embedder: Embedder | None = None) -> Verdict:
    """Library entry point of `reembed verify`."""
    if settings.model is None:
        raise ConfigError("verify needs the registry's model: give --model (a local model directory)")
    if options.sample < 1 and not options.every_row:
        raise ConfigError(f"--sample must be a positive number of rows, got {options.sample}")
    if not 0.0 < options.min_cosine <= 1.0:
        raise ConfigError(f"--min-cosine must be in (0, 1], got {options.min_cosine}")
    started = time.monotonic()
    with db.connect(settings.target.conninfo(), role="verify", autocommit=True) as conn:
        with db.translated():
            info = inspect_target(conn, settings.target)
            registry = Signature.from_registry(read_registry(conn, info))
            if registry is None:
                raise ConfigError(f"the registry {'.'.join(info.registry)} has no row: nothing says which model "
                                  "the vectors are from; nothing to verify against")
            given = settings.model.model_name
            if given is not None and given != registry.name:
                raise ConfigError(f"--model-name {given} is not the registry's model name {registry.name}; give "
                                  "the name the run recorded (or leave --model-name out: the hash is what is checked)")
            if embedder is None:
                spec = settings.model.for_target(settings.target)
                name, model_hash = fingerprint(spec)
                if model_hash != registry.hash:
                    raise ConfigError(
                        f"--model {settings.model.model} (hash {model_hash[:19]}…) is not the registry's model "
                        f"{registry.name} (hash {registry.hash[:19]}…); give the registry's model, with the "
                        "--prefix and --max-seq-length it was run with")
                embedder = SentenceTransformerEmbedder(spec, model_hash=model_hash)
            elif embedder.signature.hash != registry.hash:
                raise ConfigError(f"the embedder given is {embedder.signature.name}, not the registry's "
                                  f"{registry.name}; nothing to verify against")
            found = _Rows(conn, info, registry, embedder, options)
            found.check()
            data = found.as_dict()
            data.update(_around(conn, info, registry))
    data["duration_secs"] = round(time.monotonic() - started, 3)
    bad = any(data["counts"][k] for k in WRONG) or bool(data["left_behind"]) \
        or data.get("column_dimension") not in (None, registry.dimension)
    verdict = Verdict(data, exit_code=EXIT_FAILED if bad else EXIT_OK)
    log.info("verified", rows_checked=data["rows_checked"], wrong=sum(data["counts"][k] for k in WRONG),
             ok=not bad, duration_secs=data["duration_secs"])
    return verdict


class _Rows:
    """The rows checked and what was found in them."""

    def __init__(self, conn: psycopg.Connection[Any], info: TableInfo, registry: Signature, embedder: Embedder,
                 options: VerifyOptions) -> None:
        self.conn, self.info, self.registry, self.embedder, self.options = conn, info, registry, embedder, options
        self.counts = dict.fromkeys((*WRONG, "agree", "null_content", "accepted_null"), 0)
        self.wrong: dict[str, list[str]] = {k: [] for k in WRONG}
        self.cosines: list[np.ndarray] = []
        self.checked = 0

    def check(self) -> None:
        for rows in self._pages():
            self._compare(rows)

    def _pages(self) -> Any:
        info, options = self.info, self.options
        if not options.every_row:
            total = estimate_rows(self.conn, info)
            percent = min(100.0, 100.0 * 1.5 * options.sample / max(total, 1))
            yield self.conn.execute(info.statement("verify_sample"),
                                    {"percent": percent, "seed": options.seed, "n": options.sample}).fetchall()
            return
        after: str | None = None
        while True:
            rows = self.conn.execute(info.statement("verify_page"), {"after": after, "n": _PAGE}).fetchall()
            if not rows:
                return
            yield rows
            after = rows[-1]["id_text"]

    def _flag(self, kind: str, row_id: str) -> None:
        self.counts[kind] += 1
        if len(self.wrong[kind]) < _JSON_NAMED:
            self.wrong[kind].append(row_id)

    def _compare(self, rows: list[dict[str, Any]]) -> None:
        self.checked += len(rows)
        dim = self.registry.dimension
        null_vectors = [r["id_text"] for r in rows if r["content"] is not None and r["e"] is None]
        accepted = set()
        if null_vectors and ckpt.schema_present(self.conn):
            accepted = {r["row_id"] for r in self.conn.execute(query("accepted_failed_rows"), {
                "table": self.info.qualified, "column": self.info.column, "row_ids": null_vectors}).fetchall()}
        to_encode: list[tuple[str, str, np.ndarray]] = []
        for r in rows:
            row_id, content, stored = r["id_text"], r["content"], r["e"]
            if content is None:
                self.counts["null_content"] += 1
                if stored is not None:
                    self._flag("vector_without_content", row_id)
                continue
            if stored is None:
                if row_id in accepted:
                    self.counts["accepted_null"] += 1
                else:
                    self._flag("null_vector", row_id)
                continue
            vec = np.asarray(stored.to_numpy() if hasattr(stored, "to_numpy") else stored, dtype=np.float32)
            if vec.shape != (dim,):
                self._flag("wrong_dimension", row_id)
            elif not np.isfinite(vec).all():
                self._flag("not_finite", row_id)
            elif not np.any(vec):
                self._flag("zero", row_id)
            else:
                to_encode.append((row_id, content, vec))
        if not to_encode:
            return
        fresh = np.asarray(self.embedder.encode([c for _, c, _ in to_encode]), dtype=np.float32)
        stored = np.stack([v for _, _, v in to_encode])
        norms = np.linalg.norm(stored, axis=1) * np.linalg.norm(fresh, axis=1)
        cosine = np.divide((stored * fresh).sum(axis=1), norms, out=np.zeros(len(norms), dtype=np.float32),
                           where=norms > 0)
        self.cosines.append(cosine)
        for (row_id, _, _), cos in zip(to_encode, cosine, strict=True):
            if cos < self.options.min_cosine:
                self._flag("disagree", row_id)
            else:
                self.counts["agree"] += 1

    def as_dict(self) -> dict[str, Any]:
        cos = np.concatenate(self.cosines) if self.cosines else np.empty(0)
        return {
            "table": self.info.qualified,
            "column": self.info.column,
            "column_type": self.info.column_type,
            "column_dimension": self.info.typmod,
            "registry": self.registry.as_dict(),
            "rows_checked": self.checked,
            "every_row": self.options.every_row,
            "seed": self.options.seed,
            "min_cosine": self.options.min_cosine,
            "counts": self.counts,
            "wrong": self.wrong,
            "cosine": {"min": float(cos.min()) if cos.size else None,
                       "median": float(np.median(cos)) if cos.size else None},
        }


def _around(conn: psycopg.Connection[Any], info: TableInfo, registry: Signature) -> dict[str, Any]:
    """The job running (if any), what our jobs left behind, what a dimension change would refuse."""
    out: dict[str, Any] = {"active_job": None, "left_behind": [], "would_refuse": ""}
    job = ckpt.active_job(conn, info)
    if job is not None:
        out["active_job"] = {"job_id": job.id, "state": job.state, "target": job.target.name,
                             "rows_done": int(ckpt.progress(conn, job)["rows_done"])}
    for row in conn.execute(query("capture_triggers"), {"table_oid": info.oid}).fetchall():
        owner = capture.owner(row["trigger_name"])
        other = ckpt.find(conn, owner) if owner is not None and ckpt.schema_present(conn) else None
        if other is None or other.state not in ckpt.ACTIVE:
            out["left_behind"].append(
                f"trigger {row['trigger_name']} on {info.qualified} (its job "
                f"{'is gone' if other is None else 'is ' + other.state}): every write pays for it; "
                "`reembed run` with the registry's model drops it, or DROP TRIGGER it")
    if ckpt.schema_present(conn):
        for row in conn.execute(query("leftover_changes"), {"table": info.qualified}).fetchall():
            out["left_behind"].append(f"{int(row['n']):,} captured keys of job {row['job_id']} in reembed_changes, "
                                      "which no job will catch up: DELETE them")
    current = info.typmod or registry.dimension
    other_dim = current - 1 if current > 1 else current + 1  # any change of type: what would it refuse?
    try:
        found = dependents.take(conn, info, dimension=other_dim, source_dimension=current, probe=False)
        out["would_refuse"] = dependents.refusals(found.refused)
    except ConfigError as exc:
        out["would_refuse"] = str(exc)
    return out
