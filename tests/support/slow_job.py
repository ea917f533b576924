"""`python tests/support/slow_job.py DSN [ROWS_PER_SEC]`: a job on a slow device (SlowHashEmbedder,
64-d, ~100 rows/s by default), JSON logs at debug level on stderr, for tests that kill it at a moment
of their choosing."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/, for `support`

from reembed.job import run
from reembed.logs import configure_logging
from support.fakes import SlowHashEmbedder, job_settings


def main() -> int:
    configure_logging("json", "debug")
    rate = float(sys.argv[2]) if len(sys.argv) > 2 else 100.0
    report = run(job_settings(sys.argv[1], batch_size=16, max_writers_held=0.5),
                 embedder=SlowHashEmbedder(64, rows_per_sec=rate))
    return report.exit_code


if __name__ == "__main__":
    sys.exit(main())
