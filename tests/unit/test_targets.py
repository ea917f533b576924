"""The targets of a job over several tables, read from the command line or a --targets file, with no
database: what pairs with which --table, and every refusal a one-line ConfigError."""

from __future__ import annotations

from pathlib import Path

import pytest

from reembed.cli import build_parser
from reembed.errors import ConfigError
from reembed.settings import Target, read_targets_file, targets_from_args


def targets(*argv: str) -> tuple[Target, ...]:
    return targets_from_args(build_parser().parse_args(["run", "--model", "m", "--dsn", "d", *argv]))


def test_options_given_once_apply_to_every_table_and_once_per_table_pair_in_order() -> None:
    found = targets("--table", "documents", "--table", "app.chunks", "--column", "vec",
                    "--content", "title || body", "--content", "")
    assert found == (
        Target(dsn="d", table="documents", column="vec", content="title || body"),
        Target(dsn="d", table="app.chunks", column="vec", content=None),  # '' reads its --content-column
    )
    assert targets() == (Target(dsn="d"),)  # no --table: the default table


def test_an_option_given_neither_once_nor_once_per_table_is_refused() -> None:
    with pytest.raises(ConfigError, match="^--column is given 2 times for 3 --table: give it once"):
        targets("--table", "a", "--table", "b", "--table", "c", "--column", "x", "--column", "y")


def test_a_table_named_twice_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"^a\.embedding is named twice"):
        targets("--table", "a", "--table", "b", "--table", "a")


def test_a_targets_file_gives_each_table_its_own_options(tmp_path: Path) -> None:
    path = tmp_path / "t.toml"
    path.write_text('[[target]]\ntable = "documents"\ncontent = "title"\n\n'
                    '[[target]]\ntable = "chunks"\ncolumn = "vec"\nnull-content = "empty"\n')
    assert read_targets_file(str(path), dsn="d") == (
        Target(dsn="d", table="documents", content="title"),
        Target(dsn="d", table="chunks", column="vec", null_content="empty"),
    )
    assert targets("--targets", str(path))[1].column == "vec"


@pytest.mark.parametrize(("text", "said"), [
    ('[[target]]\ncolumn = "e"\n', "has no table"),
    ('[[target]]\ntable = "a"\nregistry = "r"\n', "unknown key registry"),
    ('registry = "r"\n[[target]]\ntable = "a"\n', "unknown key registry: the file holds [[target]] entries only"),
    ('[[target]]\ntable = "a"\ncontent = "x"\ncontent-column = "y"\n', "gives both content and content-column"),
    ('[[target]]\ntable = "a"\nnull-content = "zero"\n', "null-content must be"),
    ('[[target]]\ntable = ""\n', "table must be a non-empty string"),
    ("", "names no table"),
    ("[[target]\n", "is not valid TOML"),
])
def test_a_bad_targets_file_is_refused_with_one_line_naming_it(tmp_path: Path, text: str, said: str) -> None:
    path = tmp_path / "t.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as refused:
        read_targets_file(str(path))
    assert said in str(refused.value) and str(path) in str(refused.value) and "\n" not in str(refused.value)


def test_a_targets_file_with_tables_on_the_command_line_too_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "t.toml"
    path.write_text('[[target]]\ntable = "a"\n')
    with pytest.raises(ConfigError, match="names the tables: give --table in the file instead"):
        targets("--targets", str(path), "--table", "b")
    with pytest.raises(ConfigError, match="no such file"):
        targets("--targets", str(tmp_path / "missing.toml"))
