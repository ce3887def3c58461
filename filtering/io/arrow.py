"""Arrow helpers."""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from collections.abc import Iterator


class _NoPandas(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``pandas`` as a module that fails to load (see :func:`without_pandas`).

    A lookup (``importlib.util.find_spec``, as torch and others probe for optional
    packages) gets a spec without an origin rather than an error; only importing fails,
    with the ``ImportError`` every optional-pandas caller handles."""

    def find_spec(self, name, path=None, target=None):
        if name == "pandas" or name.startswith("pandas."):
            return importlib.machinery.ModuleSpec(name, self)
        return None

    def create_module(self, spec):
        raise ImportError(f"{spec.name} is not loaded while poolsift streams (filtering/io/arrow.py: without_pandas)")

    def exec_module(self, module) -> None:  # never reached: create_module raises
        raise ImportError(module.__name__)


_FINDER = _NoPandas()


def block_pandas() -> bool:
    """Make ``import pandas`` fail in this process, unless pandas is loaded already or
    blocked; returns whether this call set the block."""
    if "pandas" in sys.modules or pandas_blocked():
        return False
    sys.meta_path.insert(0, _FINDER)
    return True


def pandas_blocked() -> bool:
    """Whether ``import pandas`` fails here by :func:`block_pandas` (or :func:`without_pandas`)."""
    return _FINDER in sys.meta_path


@contextlib.contextmanager
def without_pandas() -> Iterator[None]:
    """Run with pandas unimportable (unless it is loaded already), so pyarrow does not load it.

    pyarrow imports pandas, when installed, on the first conversion of an array
    (``to_numpy``, ``pa.array``, ``Table.filter``), only to check inputs for pandas
    objects and set up pandas' null values: about 0.3 CPU seconds in every process, the
    driver and each worker (three in ``bench/bench_scale.py``; 0.9 of a 6.4M-row run's
    12 CPU seconds). pyarrow does without it when the import fails. The streaming plan
    (``pipelines/executors/streaming.py``) runs under this when the driver has not
    imported torch: it hands pyarrow no pandas object and asks it for none, and what its
    workers load (faiss, the language identifiers) does not need pandas. Worker processes
    forked inside inherit the block; spawned task-pool workers set it with
    :func:`block_pandas`. Leaving the block restores imports (a test calling a run
    in-process gets pandas back afterwards).
    """
    installed = block_pandas()
    try:
        yield
    finally:
        if installed and pandas_blocked():
            sys.meta_path.remove(_FINDER)


def conform(table, schema):
    """``table`` with ``schema``'s columns, in its order and types: each cast, or all null
    where ``table`` lacks it. What ``pa.concat_tables(..., promote_options="permissive")``
    makes of one table's rows when ``schema`` is the unified schema of the tables
    (``pa.unify_schemas(..., promote_options="permissive")``): the shard plan's one-shard
    pools take the whole pool's columns this way."""
    import pyarrow as pa

    if table.schema.equals(schema):
        return table
    n = table.num_rows
    names = set(table.column_names)
    columns = [table.column(f.name).cast(f.type) if f.name in names else pa.nulls(n, f.type) for f in schema]
    return pa.Table.from_arrays(columns, schema=schema)


def unify_shards(schemas, shards: list[str], what: str):
    """The shards' ``schemas`` unified as ``pa.concat_tables(..., promote_options="permissive")``
    unifies their tables (:func:`conform` casts each shard to the result); where they
    cannot be, an :class:`~filtering.errors.InputError` in one line naming the column, its
    two types and the two shards (``shards[i]`` has ``schemas[i]``) that hold them, the first
    pair in shard order. ``what``: the config key the shards come from."""
    import pyarrow as pa

    from filtering.errors import InputError

    unmergeable = (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError)
    try:
        return pa.unify_schemas(list(schemas), promote_options="permissive")
    except unmergeable as e:
        cause = " ".join(str(e).split())[:200]
    seen: dict[str, list[tuple[object, str]]] = {}  # per column, each distinct type and its first shard
    for schema, shard in zip(schemas, shards, strict=True):
        for field in schema:
            types = seen.setdefault(field.name, [])
            for type_, first in types:
                try:
                    pa.unify_schemas(
                        [pa.schema([(field.name, type_)]), pa.schema([field])], promote_options="permissive"
                    )
                except unmergeable:
                    raise InputError(
                        f"{what}: column {field.name!r} is {type_} in {first} but {field.type} in {shard}, "
                        "which do not unify (make the shards' types agree)"
                    ) from None
            if all(type_ != field.type for type_, _ in types):
                types.append((field.type, shard))
    raise InputError(f"{what}: the shards' schemas do not unify ({cause})")
