"""The run config: YAML parsed into typed models that reject unknown keys (docs/spec.md, "Config").

Errors are one line naming the key path and, where known, the valid choices, e.g.
``filters[0].clip_score.top_fracton: unknown key; did you mean top_fraction?``.
``--set key.path=value`` overrides are applied to the raw YAML before validation.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from pydantic import PositiveInt, ValidationError, field_validator, model_validator

from filtering.errors import ConfigError, InputError
from filtering.filters.compose import FilterNode
from filtering.registry import FILTERS, SCORERS, parse_filters, parse_scorers
from filtering.settings import ClustersConfig, ModelConfig, Strict, UidConfig
from filtering.stages.image_decode import DEFAULT_IMAGE_FORMATS, IMAGE_FORMATS
from filtering.validation import format_validation_error


class InputConfig(Strict):
    shards: str | list[str] | None = None
    datacomp_metadata: str | None = None
    uid: UidConfig = UidConfig()
    # The image decoders poolsift may use, on the pool, reference sets and the report's
    # thumbnails (filtering/stages/image_decode.py): other formats fail the sample.
    image_formats: tuple[str, ...] = DEFAULT_IMAGE_FORMATS

    @field_validator("image_formats", mode="before")
    @classmethod
    def _image_formats(cls, value: Any) -> tuple[str, ...]:
        names = [value] if isinstance(value, str) else value
        if not isinstance(names, list | tuple) or not names:
            raise ValueError(f"must be a non-empty list of image formats from {', '.join(IMAGE_FORMATS)}")
        out: list[str] = []
        for name in names:
            upper = name.upper() if isinstance(name, str) else None
            if upper == "JPG":
                upper = "JPEG"
            if upper not in IMAGE_FORMATS:
                raise ValueError(f"unknown image format {name!r}; valid: {', '.join(IMAGE_FORMATS)}")
            if upper not in out:
                out.append(upper)
        return tuple(out)

    @model_validator(mode="after")
    def _one_source(self) -> InputConfig:
        if (self.shards is None) == (self.datacomp_metadata is None):
            raise ValueError("give exactly one of input.shards or input.datacomp_metadata")
        if self.datacomp_metadata is not None and self.uid.model_dump(exclude={"duplicates"}) != UidConfig().model_dump(
            exclude={"duplicates"}
        ):
            raise ValueError("uid: DataComp metadata has its own uid column; only input.uid.duplicates applies to it")
        return self


class OutputConfig(Strict):
    dir: str = "runs/default"
    webdataset: bool = False
    samples_per_shard: PositiveInt = 10_000
    rows_per_part: PositiveInt = 1_000_000
    dropped: bool = True
    report: bool = False


class ExecutionConfig(Strict):
    """How the shard plan (pipelines/executors/streaming.py) runs; never what it writes.
    (``mode`` was retired with the in-memory plan: :func:`retired_execution`.)"""

    # where the plan spills its arrays between phases when output.dir is remote: a local
    # folder every worker sees (required on a Ray cluster of several nodes: a shared mount)
    spill_dir: str | None = None
    # the local process pool's workers for the plan's tasks (default: one per core, or
    # POOLSIFT_WORKERS); on Ray the cluster's CPUs decide
    workers: PositiveInt | None = None

    @field_validator("spill_dir")
    @classmethod
    def _spill_dir(cls, value: str | None) -> str | None:
        if value is not None and "://" in value and not value.startswith("file://"):
            raise ValueError(f"must be a local folder (a shared mount on a Ray cluster), not a URL: {value!r}")
        return value


class Config(Strict):
    input: InputConfig
    model: ModelConfig = ModelConfig()
    clusters: ClustersConfig | None = None
    scorers: list[Any] = []  # [{embedding_head: {...}}, ...]: filtering/scorers/, parsed in parse_config
    filters: list[Any] = []
    output: OutputConfig = OutputConfig()
    execution: ExecutionConfig = ExecutionConfig()

    _filter_tree: list[FilterNode] = []
    _scorers: list[Any] = []
    _written_paths: dict[str, tuple[str, str]] = {}  # resolved path -> (as the config file wrote it, its folder)
    _notes: list[str] = []  # one line each, logged when the run starts (a retired key that changes nothing)

    @property
    def notes(self) -> list[str]:
        return self._notes

    @property
    def scorer_list(self) -> list[Any]:
        """The ``scorers:`` entries as :class:`filtering.scorers.base.Scorer` objects."""
        return self._scorers

    @property
    def filter_tree(self) -> list[FilterNode]:
        return self._filter_tree

    def to_dict(self) -> dict[str, Any]:
        d = self.model_dump(mode="json")
        if not d.get("scorers"):  # configs without scorers record (and hash) as they did before the section existed
            d.pop("scorers", None)
        d.pop("execution", None)  # how a run executes never changes its outputs: not part of the config's identity
        return d

    def sha256(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()


_SET_RE = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)|\[(\d+)\]")


def apply_override(raw: dict, assignment: str) -> None:
    """Apply one ``key.path=value`` override; the value is parsed as a YAML scalar or list."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected key.path=value")
    key, value = assignment.split("=", 1)
    parts: list[str | int] = []
    for segment in key.split("."):
        tokens = _SET_RE.findall(segment)
        if not tokens or "".join(n or f"[{i}]" for n, i in tokens) != segment:
            raise ConfigError(f"--set {key!r}: malformed key path")
        parts += [n if n else int(i) for n, i in tokens]
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        nxt = parts[i + 1]
        try:
            if isinstance(part, int):
                node = node[part]
            else:
                if node.get(part) is None:
                    node[part] = [] if isinstance(nxt, int) else {}
                node = node[part]
        except (IndexError, KeyError, TypeError, AttributeError) as e:
            raise ConfigError(f"--set {key}: no such key path in the config") from e
    last = parts[-1]
    parsed = parse_yaml_value(value, f"--set {key}")
    try:
        node[last] = parsed
    except (IndexError, TypeError) as e:
        raise ConfigError(f"--set {key}: no such key path in the config") from e


# A config is a few hundred values; YAML aliases can make a 500-byte file expand to
# billions (the "billion laughs"), which validation would then walk value by value.
MAX_CONFIG_VALUES = 100_000


def _yaml_error(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}" if mark else ""
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    return f"invalid YAML{where}: {problem}"


def parse_yaml_value(text: str, what: str) -> Any:
    """Parse YAML text (safe tags only) into plain values; errors are one line naming ``what``."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{what}: {_yaml_error(e)}") from e
    except RecursionError as e:
        raise ConfigError(f"{what}: invalid YAML: nested too deeply") from e
    check_expanded_size(value, what)
    return value


def check_expanded_size(value: Any, what: str, limit: int = MAX_CONFIG_VALUES) -> None:
    """Refuse values whose aliases expand past ``limit`` values, or refer to themselves.

    Shared (aliased) containers are counted once per reference without being walked
    again, so the check costs one visit per distinct container.
    """
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(v: Any) -> int:
        if not isinstance(v, dict | list):
            return 1
        key = id(v)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise ConfigError(f"{what}: a YAML alias refers to itself")
        active.add(key)
        children = list(v.keys()) + list(v.values()) if isinstance(v, dict) else v
        total = 1
        for child in children:
            total += size(child)
            if total > limit:
                raise ConfigError(f"{what}: YAML aliases expand to more than {limit:,} values")
        active.discard(key)
        sizes[key] = total
        return total

    size(value)


def load_raw(path: str | Path, written_paths: dict[str, tuple[str, str]] | None = None) -> dict:
    """The config file as plain values, its relative paths resolved against its folder;
    ``written_paths`` (when given) gets each resolved path's original, for error messages."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(path)!r} not found")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start})") from e
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config: {e.strerror or e}") from e
    raw = parse_yaml_value(text, str(path))
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the config must be a YAML mapping")
    resolved = resolve_paths(raw, p.parent)
    if written_paths is not None:
        written_paths.update(resolved)
    return raw


# Top-level keys that name paths; ``pretrained`` only when it is a path, not a tag.
PATH_KEYS = (
    ("input", "shards"),
    ("input", "datacomp_metadata"),
    ("model", "pretrained"),
    ("clusters", "reference"),
    ("clusters", "centroids"),
    ("output", "dir"),
    ("execution", "spill_dir"),
)
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


def _is_local_path(value: Any, key: str) -> bool:
    if not isinstance(value, str) or not value or "://" in value and not value.startswith("file://"):
        return False
    if key == "model.pretrained":  # open_clip tags (openai, laion2b_s34b_b79k) and hf-hub: are not paths
        return not value.startswith("hf-hub:") and ("/" in value or value.endswith(CHECKPOINT_SUFFIXES))
    return True


def config_paths(raw: Any) -> Iterator[tuple[str, Any, Any]]:
    """``(key path, container, key)`` of every local path a raw config names, filters included."""
    if not isinstance(raw, dict):
        return
    for section, key in PATH_KEYS:
        node = raw.get(section)
        if not isinstance(node, dict):
            continue
        value = node.get(key)
        if isinstance(value, list):
            for i, item in enumerate(value):
                if _is_local_path(item, f"{section}.{key}"):
                    yield f"{section}.{key}[{i}]", value, i
        elif _is_local_path(value, f"{section}.{key}"):
            yield f"{section}.{key}", node, key
    if isinstance(raw.get("filters"), list):
        yield from _filter_paths(raw["filters"], "filters")
    if isinstance(raw.get("scorers"), list):
        yield from _scorer_paths(raw["scorers"], "scorers")


def _filter_paths(specs: list, path: str) -> Iterator[tuple[str, Any, Any]]:
    for i, spec in enumerate(specs):
        if not isinstance(spec, dict) or len(spec) != 1:
            continue
        ((name, params),) = spec.items()
        sub = f"{path}[{i}].{name}"
        if name in ("all", "any") and isinstance(params, list):
            yield from _filter_paths(params, sub)
        elif name == "not":
            yield from ((sub + p.removeprefix(f"{sub}[0]"), c, k) for p, c, k in _filter_paths([params], sub))
        elif name in FILTERS and isinstance(params, dict):
            for field in getattr(FILTERS[name].Params, "path_fields", ()):
                value = params.get(field)
                if isinstance(value, list):  # a list of paths (dedup's against)
                    for k, item in enumerate(value):
                        if _is_local_path(item, field):
                            yield f"{sub}.{field}[{k}]", value, k
                elif _is_local_path(value, field):
                    yield f"{sub}.{field}", params, field


def _scorer_paths(specs: list, path: str) -> Iterator[tuple[str, Any, Any]]:
    """The path fields (``Params.path_fields``) of each ``scorers:`` entry, e.g. a head's ``weights``."""
    for i, spec in enumerate(specs):
        if isinstance(spec, dict) and len(spec) == 1:
            ((name, params),) = spec.items()
            if name in SCORERS and isinstance(params, dict):
                for field in getattr(SCORERS[name].Params, "path_fields", ()):
                    if _is_local_path(params.get(field), field):
                        yield f"{path}[{i}].{name}.{field}", params, field


def resolve_paths(raw: dict, base: str | Path, absolute: bool = False) -> dict[str, tuple[str, str]]:
    """Rewrite the relative paths of a raw config so they point where they did from ``base``,
    the config file's folder (docs/spec.md, "Semantics that must match DataComp exactly":
    relative paths). They are written relative to the working directory when they
    lie under it, so a config run from its usual place records the same paths (and
    config hash) on every machine; otherwise (or with ``absolute``) as absolute paths.
    Returns ``{resolved: (as written, base folder)}`` for the paths it rewrote."""
    base_abs = os.path.abspath(base)
    cwd = os.getcwd()
    written: dict[str, tuple[str, str]] = {}
    for _, container, key in list(config_paths(raw)):
        value = container[key]
        local = value.removeprefix("file://")
        # "~/x" is the user's home on whatever machine runs it: kept as written (so the
        # recorded config is the same everywhere), expanded where the file is opened.
        if os.path.isabs(local) or local.startswith(("{", "~")):  # a brace list may hold absolute paths
            continue
        target = os.path.normpath(os.path.join(base_abs, local))
        rel = os.path.relpath(target, cwd)
        container[key] = target if absolute or rel == ".." or rel.startswith("../") else rel
        written[container[key]] = (value, base_abs)
    return written


def expand_local(pattern: str) -> Iterator[tuple[str, list[str]]]:
    """Each brace alternative of ``pattern`` with the local files or folders it names."""
    import braceexpand

    for one in braceexpand.braceexpand(pattern):
        path = os.path.expanduser(one.removeprefix("file://"))
        if any(c in path for c in "*?["):
            yield one, glob.glob(path, recursive=True)
        else:
            yield one, [path] if os.path.exists(path) else []


def _may_be_missing(key: str, params: Any, field: str) -> bool:
    """Whether the filter at ``key`` (``filters[2].language.model_path``) handles a missing
    file itself (``Params.path_may_be_missing``: the language filter's fallback)."""
    parts = key.split(".")
    cls = FILTERS.get(parts[-2]) if key.startswith("filters") and len(parts) >= 2 else None
    return cls is not None and isinstance(params, dict) and cls.Params.path_may_be_missing(params, field)


def check_local_paths(cfg: Config, under: str = "") -> None:
    """Every local input path the config names (or only those whose key starts with
    ``under``, e.g. ``scorers``) exists, checked without touching data
    (docs/spec.md, "CLI": validate): only ``stat`` and glob listings, never file contents.
    Raises :class:`InputError` (exit 2) naming the first missing one and its key, as the
    config file wrote it, with the folder it resolved against and the folder that is missing."""
    raw = cfg.to_dict()
    raw["filters"] = cfg.filters
    for key, container, k in config_paths(raw):
        if (
            key in ("output.dir", "execution.spill_dir")
            or not key.startswith(under)
            or _may_be_missing(key, container, k)
        ):
            continue
        value = container[k]
        alternatives = list(expand_local(value))
        if all(found for _, found in alternatives):
            continue
        written, base = cfg._written_paths.get(value, (value, None))
        raise InputError(_missing_path_message(key, value, written, base, alternatives))


PLACEHOLDER_PREFIX = "path/to/"  # the shipped presets' stand-in for the user's data


def _missing_path_message(key: str, value: str, written: str, base: str | None, alternatives: list) -> str:
    """``input.shards: no shards found at '../pool/{0..3}.tar': no folder '../pool' (relative
    paths resolve against the config's folder, configs/)``; a preset's ``path/to/...``
    placeholder names the ``--set`` that replaces it."""
    import braceexpand

    if base is not None and written.lstrip("{").startswith(PLACEHOLDER_PREFIX):
        return (
            f"{key}: {written!r} is a placeholder: point it at your data with --set {key}=... "
            "(or in a copy of the config)"
        )
    shown = list(braceexpand.braceexpand(written)) if base is not None else [p for p, _ in alternatives]
    if len(shown) != len(alternatives):  # a brace inside ".." segments: show the resolved paths
        shown, base = [p for p, _ in alternatives], None
    missing = [i for i, (_, found) in enumerate(alternatives) if not found]
    what = written if len(missing) == len(alternatives) else shown[missing[0]]
    head = (
        f"input.shards: no shards found at {what!r}"
        if key.startswith("input.shards")
        else (f"{key}: no such file or folder {what!r}")
    )
    folder = os.path.dirname(os.path.expanduser(alternatives[missing[0]][0].removeprefix("file://")))
    several = len(alternatives) > 1 or any(c in what for c in "*?[")  # one plain path names itself
    if several and folder and not any(c in folder for c in "*?[") and not os.path.isdir(folder):
        head += f": no folder {os.path.dirname(shown[missing[0]].removeprefix('file://'))!r}"
    if base is not None:
        rel = os.path.relpath(base)
        where = base if rel == ".." or rel.startswith("../") else rel
        head += f" (relative paths resolve against the config's folder, {where.rstrip(os.sep)}{os.sep})"
    return head


def retired_mode(mode: Any) -> str:
    """``execution.mode`` (retired with the in-memory plan: every run is on the shard plan):
    ``auto`` and ``streaming`` ran the shard plan already, so the key is dropped with a note
    (returned); ``memory`` and anything else stop in one line."""
    if mode in ("auto", "streaming"):
        return f"execution.mode: {mode} is ignored: every run uses the shard plan now (remove the key)"
    raise ConfigError(
        f"execution.mode: {mode}: the in-memory plan was retired in favour of the shard plan, which every run "
        "uses; remove the key"
    )


def parse_config(raw: dict) -> Config:
    check_expanded_size(raw, "config")
    notes = []
    execution = raw.get("execution") if isinstance(raw, dict) else None
    if isinstance(execution, dict) and "mode" in execution:
        notes.append(retired_mode(execution["mode"]))
        raw = {**raw, "execution": {k: v for k, v in execution.items() if k != "mode"}}
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, Config)) from e
    if not isinstance(raw.get("filters", []), list):
        raise ConfigError("filters: must be a list of filters")
    cfg._filter_tree = parse_filters(cfg.filters, path="filters", input_kind=input_kind(cfg))
    cfg._notes = notes
    if cfg.scorers:
        from filtering.scorers.base import input_info

        cfg._scorers = parse_scorers(cfg.scorers, input_info(input_kind(cfg), cfg.model.arch))
    return cfg


def input_kind(cfg: Config) -> str:
    return "datacomp" if cfg.input.datacomp_metadata else "webdataset"


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    written: dict[str, tuple[str, str]] = {}
    raw = load_raw(path, written)
    for assignment in overrides:
        apply_override(raw, assignment)
    cfg = parse_config(raw)
    cfg._written_paths = written
    return cfg
