"""`python scripts/simworker.py DSN ROWS_PER_SEC [RANGES]`: one worker of a job on a SIMULATED
device (the tests' hash embedder, 384-d, sleeping 1/ROWS_PER_SEC per row as a device's time; 0:
no sleep, the write ceiling), for scripts/bench.py's workers section. Every copy started on the
same table joins the one job (the first prepares it, the last out finalizes)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from reembed.job import run
from reembed.settings import ModelSpec, RunOptions, Settings, Target
from support.fakes import HashEmbedder, SlowHashEmbedder


def main() -> int:
    dsn, rate = sys.argv[1], float(sys.argv[2])
    ranges = int(sys.argv[3]) if len(sys.argv) > 3 else 64
    emb = (SlowHashEmbedder(384, rows_per_sec=rate, name="simulated") if rate > 0
           else HashEmbedder(384, name="simulated"))
    options = RunOptions(batch_size=256, confirm_seconds=0, progress_interval=3600, ranges=ranges, join_wait=120.0,
                         max_replica_lag=None, autovacuum_pause="never")
    return run(Settings(target=Target(dsn=dsn), model=ModelSpec(model="simulated"), options=options),
               embedder=emb).exit_code


if __name__ == "__main__":
    sys.exit(main())
