"""Core statements compiled once for a dialect and run on the DB-API cursor.

For the receiver's hot path (db.ingest), where SQLAlchemy's per-execution work (the
Session, the transaction bookkeeping, the cache lookup and result wrapping) costs
several times what SQLite or PostgreSQL spend on the statement. The SQL and the value
conversions are still SQLAlchemy's: the statement is compiled by the engine's dialect,
and each value goes through its column type's bind processor, so both paths write the
same values.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, cast

from sqlalchemy.engine import Dialect
from sqlalchemy.sql import ClauseElement
from sqlalchemy.sql.compiler import SQLCompiler


class DriverStatement:
    """One statement, compiled for `dialect`; `execute` binds a dict of values by name."""

    def __init__(self, statement: ClauseElement, dialect: Dialect) -> None:
        compiled = cast(SQLCompiler, statement.compile(dialect=dialect))
        self.sql = compiled.string
        self._positional = tuple(compiled.positiontup or ()) if compiled.positional else None
        self._processors: dict[str, Callable[[Any], Any]] = {}
        self._defaults: dict[str, Any] = {}
        self._required: set[str] = set()
        for bind, name in compiled.bind_names.items():
            processor = bind.type.dialect_impl(dialect).bind_processor(dialect)
            if processor is not None:
                self._processors[name] = processor
            if bind.required:
                self._required.add(name)
            else:  # a literal of the statement (a CASE's value, a SET to NULL)
                self._defaults[name] = bind.value
        if getattr(compiled, "post_compile_params", None) or getattr(compiled, "literal_execute_params", None):
            raise ValueError("DriverStatement: expanding or literal-execute parameters are not supported")

    def parameters(self, values: Mapping[str, Any]) -> tuple[Any, ...] | dict[str, Any]:
        missing = self._required.difference(values)
        if missing:
            raise KeyError(f"DriverStatement: no value for {sorted(missing)}")
        bound = {**self._defaults, **values}
        for name, processor in self._processors.items():
            bound[name] = processor(bound[name])
        if self._positional is not None:
            return tuple(bound[name] for name in self._positional)
        return {name: bound[name] for name in (*self._required, *self._defaults)}

    def execute(self, cursor: Any, values: Mapping[str, Any]) -> Any:
        cursor.execute(self.sql, self.parameters(values))
        return cursor
