"""The library is what the README says it is: its example runs as written."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path
from typing import Any

from support.database import make_table
from support.models import assert_rows_hold_the_models_vectors

README = Path(__file__).resolve().parents[2] / "README.md"


def _example() -> str:
    text = README.read_text()
    section = text[text.index("## The library"):]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match is not None, "the README's library section has no python example"
    return match.group(1)


def test_the_readmes_library_example_runs_as_written(dsn: str, static_model_dir: Any) -> None:
    model = static_model_dir(48)
    make_table(dsn, rows=40, old_dim=64)
    code = _example()
    assert len(code.strip().splitlines()) <= 6
    code = code.replace("postgresql://app@db/prod", dsn).replace("/models/all-MiniLM-L6-v2", str(model))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, str(README), "exec"), {})  # the README's own example, as written
    assert printed.getvalue() == "done 40\n"
    assert assert_rows_hold_the_models_vectors(dsn, model) == 40

