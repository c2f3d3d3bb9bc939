"""Compact column types: what a result row needs, in as few bytes as each database allows.

Every record gets a result per model version, so a byte per result is tens of megabytes at
Europeana's size. Readers still get the values they always got:

- `Scores`: the score vector. PostgreSQL keeps it as `real[]` (4 bytes a class, no text);
  SQLite, the embedded default, keeps JSON. The pipeline stores scores with 6 decimals, and
  a float32 holds any 6-decimal number in [0, 4] closely enough that rounding it back to 6
  decimals gives the number exactly; a raw float32 score reads back as itself
  (`exact_scores`). Only a score that is neither reads back as its nearest float32.
- `Sha256`: an image's SHA-256, 32 bytes stored, its 64 hex digits read and written.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import sqlalchemy as sa
from sqlalchemy import JSON, LargeBinary
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Dialect
from sqlalchemy.types import REAL, TypeDecorator, TypeEngine

# Stored scores keep this many decimals (see `runs.pipeline`).
SCORE_DECIMALS = 6


class Scores(TypeDecorator[list[float]]):
    """A score vector: `real[]` on PostgreSQL, JSON on SQLite; a list of floats in Python."""

    impl = JSON
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "postgresql":
            return dialect.type_descriptor(postgresql.ARRAY(REAL(), dimensions=1))
        return dialect.type_descriptor(JSON(none_as_null=True))

    def process_result_value(self, value: Any, dialect: Dialect) -> list[float] | None:
        if value is None or dialect.name != "postgresql":
            return value
        return exact_scores(value)


def exact_scores(stored: list[float]) -> list[float]:
    """The scores written, from their float32 form: each the 6-decimal number it rounds to
    where that number's float32 is the one stored (scores as the pipeline writes them),
    else the float32 itself (a model's raw output, which a float32 holds exactly)."""
    return exact_score_array(stored).tolist()


def exact_score_array(stored: Any) -> np.ndarray:
    """`exact_scores` of any number of stored vectors at once (a matrix of them: one numpy
    pass where a row at a time cost more than reading it), as float64."""
    packed = np.asarray(stored, dtype=np.float32)
    rounded = np.round(packed.astype(np.float64), SCORE_DECIMALS)
    return np.where(rounded.astype(np.float32) == packed, rounded, packed)


def packed_scores(column: sa.ColumnElement[Any], dialect: str) -> sa.ColumnElement[Any]:
    """A `Scores` column read for `score_matrix`: on PostgreSQL the driver's list of float32
    values, not converted a row at a time (the conversion cost more than the read in the
    store's chunked rewrites); on SQLite as `Scores` reads it."""
    if dialect != "postgresql":
        return column
    return sa.type_coerce(column, sa.types.NullType())


def among(
    column: sa.ColumnElement[Any], values: Sequence[Any], dialect: str
) -> sa.ColumnElement[bool]:
    """`column IN values`. On PostgreSQL one array parameter (`= ANY`), which the driver
    renders in C: an IN list of hundreds of bound parameters cost SQLAlchemy more to render
    than the database to run in the store's chunked rewrites (a retirement's chunk)."""
    if dialect != "postgresql":
        return column.in_(values)
    return column == sa.any_(sa.literal(list(values), postgresql.ARRAY(column.type)))


def score_matrix(vectors: Sequence[Any], dialect: str, classes: int) -> np.ndarray:
    """`packed_scores` values (none NULL, each of `classes` scores) as one float64 matrix of
    that many columns (none: no rows), each score the number `Scores` reads for it."""
    if dialect != "postgresql":
        matrix = np.asarray(vectors, dtype=np.float64)
    else:
        matrix = exact_score_array(vectors)
    return matrix.reshape(len(vectors), classes)


def scores_literal(scores: list[float]) -> str:
    """A score vector as PostgreSQL's array text (COPY and casts): `{0.1,0.25}`."""
    # A list's repr is each float's repr, comma-separated, made in C: what the array takes.
    return "{" + str([float(score) for score in scores])[1:-1] + "}"


NULL = "\\N"  # COPY's text format
_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def copy_text(value: str | None) -> str:
    """A value in COPY's text format: \\N for NULL, backslash escapes (rarely needed, so
    looked for before any copy is made)."""
    if value is None:
        return NULL
    if "\\" in value or "\t" in value or "\n" in value or "\r" in value:
        return value.translate(_COPY_ESCAPES)
    return value


class Sha256(TypeDecorator[str]):
    """A SHA-256 digest: 32 bytes stored, hex digits in Python (as `hashlib.hexdigest` gives)."""

    impl = LargeBinary
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> bytes | None:
        return None if value is None else bytes.fromhex(value)

    def process_result_value(self, value: Any, dialect: Dialect) -> str | None:
        return None if value is None else bytes(value).hex()


def score_at(scores: sa.ColumnElement[Any], index: int, dialect: str) -> sa.ColumnElement[float]:
    """One class's score in SQL (0-based `index`), the same number `Scores` reads in Python."""
    if dialect != "postgresql":
        return sa.type_coerce(scores, JSON)[index].as_float()
    return exact_score(sa.type_coerce(scores, postgresql.ARRAY(REAL(), dimensions=1))[index + 1])


def exact_score(packed: sa.ColumnElement[Any]) -> sa.ColumnElement[float]:
    """PostgreSQL: one stored `real` score as `exact_scores` reads it, by the same arithmetic:
    a float32 times 10**6 is exact in double precision, and PostgreSQL's round() of a double
    is numpy's (rint, ties to even), so the 6-decimal candidate is numpy's to the last bit.
    The review index's writes apply it to each element of a batch's score vectors."""
    scale = sa.cast(sa.literal(10**SCORE_DECIMALS), sa.Float)
    rounded = sa.func.round(sa.cast(packed, sa.Float) * scale, type_=sa.Float) / scale
    return sa.case(
        (sa.cast(rounded, REAL()) == packed, rounded),
        else_=sa.cast(packed, sa.Float),
    )
