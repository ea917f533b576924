"""The shadow strategy's pure parts: names that fit, column references renamed in PostgreSQL's
own definitions, how the gate sends a query through an index, and the queries it makes."""

from __future__ import annotations

import random

import pytest

from reembed.dependents import rename_refs
from reembed.gate import IndexUse, make_query
from reembed.shadow import name_with


def test_a_name_with_a_suffix_fits_postgres_63_bytes_and_keeps_whole_characters() -> None:
    assert name_with("embedding", "_previous") == "embedding_previous"
    long = "é" * 40  # 80 bytes
    out = name_with(long, "_reembed12")
    assert len(out.encode()) <= 63 and out.endswith("_reembed12") and out.startswith("é")
    out.encode().decode()  # no half character


@pytest.mark.parametrize(("text", "want"), [
    ("hnsw (embedding vector_cosine_ops) WITH (m='16')", 'hnsw ("emb_new" vector_cosine_ops) WITH (m=\'16\')'),
    ("hnsw (((embedding)::halfvec(384)) halfvec_cosine_ops)", 'hnsw ((("emb_new")::halfvec(384)) halfvec_cosine_ops)'),
    ("btree (id) WHERE ((embedding IS NOT NULL) AND (source <> 'embedding'::text))",
     "btree (id) WHERE ((\"emb_new\" IS NOT NULL) AND (source <> 'embedding'::text))"),  # not inside a literal
    ("btree (id) WHERE (embedding_old IS NULL)", "btree (id) WHERE (embedding_old IS NULL)"),  # another column
    ("hnsw (t.embedding vector_l2_ops)", "hnsw (t.embedding vector_l2_ops)"),  # qualified: not ours to rename
    ("btree (embedding(id))", "btree (embedding(id))"),  # a function of that name
])
def test_column_references_are_renamed_outside_literals_and_only_as_whole_names(text: str, want: str) -> None:
    assert rename_refs(text, "embedding", "emb_new") == want


def test_a_quoted_column_name_is_renamed() -> None:
    assert rename_refs('hnsw ("My Col" vector_l2_ops)', "My Col", "x") == 'hnsw ("x" vector_l2_ops)'


def test_the_gate_sends_a_query_through_an_index_by_its_own_key_and_operator() -> None:
    plain = IndexUse.of("i", "CREATE INDEX i ON public.t USING hnsw (e vector_cosine_ops) WITH (m='16')", "e")
    assert plain is not None and (plain.key, plain.operator, plain.query_side) == ("e", "<=>", "CAST(%(q)s AS vector)")
    half = IndexUse.of("h", "CREATE INDEX h ON public.t USING hnsw (((e)::halfvec(48)) halfvec_l2_ops)", "e")
    assert half is not None and half.operator == "<->"
    assert half.query_side == "((CAST(%(q)s AS vector))::halfvec(48))"
    bits = IndexUse.of("b", "CREATE INDEX b ON public.t USING hnsw ((binary_quantize(e)::bit(64)) bit_hamming_ops)",
                       "e")
    assert bits is not None and bits.operator == "<~>" and "binary_quantize(CAST(%(q)s AS vector))" in bits.query_side
    default_ops = IndexUse.of("d", "CREATE INDEX d ON public.t USING ivfflat (e) WITH (lists='10')", "e")
    assert default_ops is not None and default_ops.operator == "<->"
    assert IndexUse.of("p", "CREATE INDEX p ON public.t USING hnsw (e vector_l2_ops) WHERE (k > 1)", "e") is None
    assert IndexUse.of("x", "CREATE INDEX x ON public.t USING btree (id) WHERE (e IS NOT NULL)", "e") is None


def test_a_query_made_from_a_row_is_one_of_its_sentences_or_half_its_words_never_the_row() -> None:
    rng = random.Random(0)
    row = "The first sentence has words. The second one has more words in it. Short. A fourth sentence is here."
    query = make_query(row, rng)
    assert query in ("The first sentence has words.", "The second one has more words in it.",
                     "A fourth sentence is here.")
    one = "alpha beta gamma delta epsilon zeta eta theta iota kappa"
    window = make_query(one, rng)
    assert window is not None and len(window.split()) == 5 and window in one
    assert make_query("too short to cut", rng) is None


def test_two_long_names_that_differ_only_past_the_cut_get_different_names_within_63_bytes() -> None:
    a = "idx_" + "a" * 60 + "_hnsw_cosine"
    b = "idx_" + "a" * 60 + "_hnsw_l2"
    for suffix in ("_previous", "_reembed123"):
        x, y = name_with(a, suffix), name_with(b, suffix)
        assert x != y and len(x.encode()) <= 63 and len(y.encode()) <= 63 and x.endswith(suffix), (x, y)
    assert name_with("short_index", "_previous") == "short_index_previous"  # fits: unchanged
