"""The package's library API: what `import reembed` gives, without a database."""

from __future__ import annotations

import reembed


def test_the_package_exports_its_library_api() -> None:
    for name in ("run", "plan", "status", "Settings", "Target", "ModelSpec", "RunOptions", "ReembedError",
                 "ConfigError", "LockHeld", "DatabaseError", "evaluate", "EvalOptions", "Comparison"):
        assert name in reembed.__all__ and getattr(reembed, name) is not None
    assert reembed.ConfigError.exit_code == 2 and reembed.LockHeld.exit_code == 3
