"""The ``poolsift`` command line (docs/spec.md, "CLI").

Exit codes: 0 success; 2 bad usage or config; 1 any other failure, with a one-line
cause on stderr (a traceback only with ``--debug``).
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
import traceback
from pathlib import Path

from filtering import __version__
from filtering.errors import ConfigError, PoolsiftError


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config file")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        help="override a config value, e.g. filters[0].clip_score.top_fraction=0.3 (repeatable)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="poolsift", description="Curate image-text pools the DataComp way.")
    parser.add_argument("--version", action="version", version=f"poolsift {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="score, cluster, filter and write the kept subset")
    _add_config_args(p)
    p.add_argument("--output", help="output directory (overrides output.dir)")
    p.add_argument("--executor", choices=["local", "ray"], default="local")
    p.add_argument("--ray-address", help="join an existing Ray cluster (default: start a local one)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")

    p = sub.add_parser("validate", help="check a config without touching data")
    _add_config_args(p)

    p = sub.add_parser(
        "make-sample",
        help="regenerate the bundled sample pool and reference set, or (--datacomp) a small DataComp-format pool",
    )
    p.add_argument("dir", help="output directory, e.g. sample_data")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--datacomp",
        action="store_true",
        help="write a pool in DataComp's metadata layout (NNNNNNNN.parquet + NNNNNNNN.npz) for input.datacomp_metadata",
    )
    p.add_argument("--rows", type=int, help="--datacomp: rows in all (default 2000)")
    p.add_argument("--shards", type=int, help="--datacomp: number of shards (default 4)")
    p.add_argument("--phash", action="store_true", help="--datacomp: add a phash column (for perceptual dedup)")

    p = sub.add_parser("report", help="write the visual HTML report of an output directory")
    p.add_argument("dir", help="a run's output directory (holds manifest.json)")
    p.add_argument("--output", help="report file (default DIR/report.html)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random sample of failures")

    p = sub.add_parser("index", help="write the index of a run's kept rows (DIR/index/) for an output without one")
    p.add_argument("dir", help="a run's output directory (holds manifest.json and subset/)")

    p = sub.add_parser("sweep", help="subset size per value of one setting, from the cached scores")
    _add_config_args(p)
    p.add_argument(
        "--param",
        required=True,
        metavar="KEY.PATH=V1,V2,...",
        help="the setting and its values, e.g. filters[0].clip_score.top_fraction=0.1,0.2,0.3,0.5",
    )
    p.add_argument("--output", help="output directory (overrides output.dir)")
    p.add_argument("--executor", choices=["local", "ray"], default="local")
    p.add_argument("--ray-address", help="join an existing Ray cluster (default: start a local one)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def _load(args) -> object:
    from pipelines.config import load_config

    overrides = list(args.overrides)
    if getattr(args, "output", None):
        overrides.append(f"output.dir={args.output}")
    return load_config(args.config, overrides)


def cmd_validate(args) -> int:
    from pipelines.executors import streaming
    from pipelines.runner import plan

    cfg = _load(args)
    streaming.check(cfg, plan(cfg, cache_root=""), None)
    for note in cfg.notes:
        print(f"poolsift: {note}", file=sys.stderr)
    n = sum(len(node.leaves()) for node in cfg.filter_tree)
    print(f"{args.config}: OK ({n} filter{'s' if n != 1 else ''}, output to {cfg.output.dir})")
    return 0


def cmd_run(args) -> int:
    from pipelines.runner import format_funnel, run

    cfg = _load(args)
    executor = _executor(args)
    before = _recorded_config(cfg.output.dir)
    try:
        result = run(cfg, executor=executor, progress=not args.quiet)
    finally:
        if executor is not None:
            executor.close()  # stops a Ray this run started; a joined cluster keeps running
    changed = _changed_sections(before, result.manifest.get("config") or {})
    if changed:
        print(
            f"poolsift: replaced the earlier result in {result.out_dir}, made with other settings "
            f"({', '.join(changed)})",
            file=sys.stderr,
        )
    print(format_funnel(result.manifest))
    print(next_steps(args, cfg, str(result.out_dir)))
    return 0


def _executor(args):
    """``--executor ray``: a Ray executor (started on first use, closed by the caller); else None."""
    if args.executor == "ray":
        from pipelines.executors.ray import RayExecutor

        return RayExecutor(address=args.ray_address)
    if args.ray_address:
        raise ConfigError("--ray-address needs --executor ray")
    return None


def _recorded_config(out_dir: str) -> dict | None:
    """The config of the result in ``out_dir`` (its manifest), or None."""
    import json

    from filtering.io.atomic import exists
    from filtering.io.paths import join, open_file

    path = join(out_dir, "manifest.json")
    try:
        if not exists(path):
            return None
        with open_file(path, "rb") as f:
            return json.loads(f.read()).get("config")
    except (OSError, ValueError, AttributeError):
        return None  # unreadable: the run checks and replaces it as it does any leftover


def _changed_sections(before: dict | None, after: dict) -> list[str]:
    """The config sections (``filters``, ``model``...) whose settings differ; ``output`` aside."""
    if not isinstance(before, dict):
        return []
    keys = (set(before) | set(after)) - {"output"}
    return sorted(k for k in keys if before.get(k) != after.get(k))


def commands(argv0: str | None = None) -> tuple[str, str]:
    """How to call poolsift and its Python again from this shell: ``poolsift`` and ``python``
    when that name on PATH is this program; else the paths it was called by
    (``.venv/bin/poolsift``, ``.venv/bin/python`` after ``make demo``, whose venv is not
    activated); else ``python -m pipelines.cli``, with this interpreter."""
    argv0 = sys.argv[0] if argv0 is None else argv0
    if os.path.basename(argv0) != "poolsift":
        python = _shown_path(sys.executable)
        return f"{python} -m pipelines.cli", python
    on_path = shutil.which("poolsift")
    if on_path and os.path.realpath(on_path) == os.path.realpath(argv0):
        return "poolsift", "python"
    python = os.path.join(os.path.dirname(argv0), "python")
    return _shown_path(argv0), _shown_path(python if os.path.exists(python) else sys.executable)


def _shown_path(path: str) -> str:
    """``path`` relative to the working directory when under it (``./x`` for a bare name), else absolute."""
    rel = os.path.relpath(os.path.abspath(path))
    shown = os.path.abspath(path) if rel.startswith("..") else rel if os.sep in rel else f".{os.sep}{rel}"
    return shlex.quote(shown)


def next_steps(args, cfg, out_dir: str, argv0: str | None = None) -> str:
    """What a run wrote and what to do next, as commands the user can paste (``make demo``
    ends with these lines)."""
    (prog, python), q = commands(argv0), shlex.quote
    lines = [
        f"output: {out_dir}",
        "  subset/          the kept samples, Parquet, one row each (uid, caption, scores, ...)",
        "  subset.npy       their uids, sorted, in DataComp's format (its resharder reads it)",
    ]
    if cfg.output.dropped:
        lines.append("  dropped/         every dropped or failed sample, with its filter and reason")
    if any(getattr(getattr(n, "filter", None), "report_name", None) == "subset_match" for n in cfg.filter_tree):
        lines.append("  subset_match/    the uids list's entries not found, and those more than one row matched")
    lines.append("  manifest.json    the config, inputs, model and the funnel above")
    if cfg.output.webdataset:
        lines.append("  shards/          the kept samples as WebDataset shards")
    if cfg.output.report:
        lines.append("  report.html      the visual report: open it in a browser")
    lines.append("next:")
    if not cfg.output.report:
        lines.append(f"  {prog} report {q(out_dir)}    # writes report.html (or set output.report: true)")
    same_run = "".join(f" --set {q(o)}" for o in args.overrides) + (
        f" --output {q(args.output)}" if args.output else ""
    )
    lines.append(f"  {prog} sweep {q(args.config)}{same_run} --param {q(sweep_param(cfg.filters))}")
    subset = os.path.join(out_dir, "subset")
    read = f"import pyarrow.parquet as pq; t = pq.read_table({subset!r}); print(t.num_rows, t.column_names)"
    lines.append(f"  {python} -c {_double_quoted(read)}")
    # `pip install duckdb` is the Python package only: it installs no `duckdb` command.
    query = f"import duckdb; duckdb.read_parquet({subset + '/*.parquet'!r}).project('uid, caption').limit(10).show()"
    lines.append(f"  {python} -c {_double_quoted(query)}    # {python} -m pip install duckdb")
    return "\n".join(lines)


def _double_quoted(text: str) -> str:
    """``text`` as one shell word, in double quotes when that needs no escapes (code and SQL
    that hold single quotes read better so), else as :func:`shlex.quote` writes it."""
    return f'"{text}"' if not any(c in text for c in '"$`\\!') else shlex.quote(text)


def sweep_param(filters: list) -> str:
    """A ``--param`` for ``poolsift sweep`` around the config's first top-level CLIP-score
    setting, else its first top-level ``score`` filter's (a quality head's threshold)."""
    for name, step in (("clip_score", 0.05), ("score", 0.1)):
        for i, spec in enumerate(filters):
            params = spec.get(name) if isinstance(spec, dict) else None
            if not isinstance(params, dict):
                continue
            if params.get("top_fraction") is not None:
                return f"filters[{i}].{name}.top_fraction=0.1,0.2,0.3,0.5"
            for key in ("min", "max"):
                if isinstance(params.get(key), int | float):
                    t, d = float(params[key]), step * max(1.0, abs(float(params[key])))
                    return f"filters[{i}].{name}.{key}=" + ",".join(f"{t + s:g}" for s in (-d, 0.0, d))
    return "KEY.PATH=V1,V2,..."


def cmd_make_sample(args) -> int:
    if args.datacomp:
        return _make_datacomp_sample(args)
    given = [f"--{k}" for k in ("rows", "shards") if getattr(args, k) is not None] + ["--phash"] * args.phash
    if given:
        raise ConfigError(f"make-sample: {', '.join(given)} only go with --datacomp")
    from filtering.sample.make import make_sample

    summary = make_sample(Path(args.dir), seed=args.seed)
    print(f"wrote the sample pool and reference set to {args.dir}: {summary}")
    return 0


def _make_datacomp_sample(args) -> int:
    from filtering.sample.datacomp import make_datacomp_sample

    rows = 2_000 if args.rows is None else args.rows
    shards = 4 if args.shards is None else args.shards
    if rows < 1 or shards < 1 or shards > rows:
        raise ConfigError(f"make-sample: --rows ({rows}) and --shards ({shards}) must be at least 1, shards <= rows")
    out = Path(args.dir)
    if out.exists() and any(out.glob("*.parquet")):
        raise ConfigError(f"make-sample: {out} already holds .parquet files; choose an empty or new folder")
    make_datacomp_sample(out, rows=rows, shards=shards, seed=args.seed, phash=args.phash)
    extra = " and phash" if args.phash else ""
    print(f"wrote a DataComp-format pool to {out}: {rows:,} rows in {shards} shards (parquet + npz embeddings{extra})")
    print(
        f"run a DataComp preset on it: poolsift run configs/clip_score_l14_30pct.yaml --set input.datacomp_metadata={out}"
    )
    return 0


def cmd_report(args) -> int:
    from filtering.report import write_report

    path = write_report(
        args.dir, output=args.output, seed=args.seed, log=lambda msg: print(f"poolsift: {msg}", file=sys.stderr)
    )
    print(f"report: {path}")
    return 0


def cmd_index(args) -> int:
    from pipelines.manifest import index_output

    folder, rows, built = index_output(args.dir)
    print(f"index: {folder} ({rows:,} kept rows{'' if built else ', already there'})")
    return 0


def cmd_sweep(args) -> int:
    from pipelines.sweep import format_sweep, sweep

    overrides = list(args.overrides) + ([f"output.dir={args.output}"] if args.output else [])
    executor = _executor(args)
    try:
        record = sweep(args.config, args.param, overrides, progress=not args.quiet, executor=executor)
    finally:
        if executor is not None:
            executor.close()  # stops a Ray this sweep started; a joined cluster keeps running
    print(format_sweep(record))
    print(f"output: {record['out_dir']}/sweep.json")
    return 0


COMMANDS = {
    "run": cmd_run,
    "validate": cmd_validate,
    "make-sample": cmd_make_sample,
    "report": cmd_report,
    "sweep": cmd_sweep,
    "index": cmd_index,
}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except PoolsiftError as e:
        if args.debug:
            traceback.print_exc()
        print(f"poolsift: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("poolsift: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 — the CLI contract: one line unless --debug
        if args.debug:
            traceback.print_exc()
        first = str(e).splitlines()[0] if str(e) else ""
        print(f"poolsift: error: {type(e).__name__}: {first} (rerun with --debug for a traceback)", file=sys.stderr)
        return 1


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
