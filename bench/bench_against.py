"""``dedup: {against: [...]}`` at scale (issue 25): a new pool deduplicated against an
earlier run's kept rows, next to the same dedup without ``against``.

Generates a reference pool of ``--reference`` rows (DataComp-format parquet shards, no
npz: ``bench_dedup_cli``'s generator: sha256 and a uint64 ``phash``) and runs it once with
``dedup: exact`` (not timed) to make the reference output and its index. Then a new pool
of ``--new`` rows, where 10% of rows copy a reference row's sha256 and 15% take a
reference row's perceptual hash with up to 4 bits flipped (the rest its own), is run with
``dedup: exact`` then ``dedup: perceptual`` (``max_distance: 6``), once without and once
with ``against: [reference output]`` on both, each in its own process tree from a fresh
output folder; the reference's block tables (``filtering/dedup/ref_blocks.py``, made by
the first run against it) are made beforehand, timed apart. Prints wall time and
peak RSS of the process tree (``bench_scale.timed``), their ratios, and the RSS added per
reference row against the issue's targets (at most 16 bytes per reference row, wall at
most 2x).

    .venv/bin/python bench/bench_against.py --dir /tmp/poolsift-against --reference 4M --new 1M
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from bench.bench_dedup_cli import _shard  # noqa: E402
from bench.bench_scale import parse_size, timed, write_shards  # noqa: E402

NEW_OFFSET = 1 << 40  # the new pool's own rows: row numbers no reference row has


def new_shard(rng, s, start, n, reference_rows: int):
    """A new pool's shard: its own sha256 and phash, except 10% exact and 15% near copies of reference rows."""
    return _shard(rng, s, start, n, reference_rows, offset=NEW_OFFSET)


def config(pool: Path, out: Path, filters: list) -> str:
    import yaml

    raw = {"input": {"datacomp_metadata": str(pool)}, "filters": filters, "output": {"dir": str(out)}}
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def run(pool: Path, out: Path, filters: list) -> tuple[float, float, float, dict]:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "pipelines.cli", "run", config(pool, out, filters), "--quiet"]
    wall, cpu, rss, _pss = timed(cmd)
    return wall, cpu, rss, json.loads((out / "manifest.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/tmp/poolsift-against")
    ap.add_argument("--reference", default="4M", help="rows of the reference pool (its run keeps about 90%%)")
    ap.add_argument("--new", default="1M", help="rows of the new pool")
    args = ap.parse_args()
    base = Path(args.dir)
    ref_rows, new_rows = parse_size(args.reference), parse_size(args.new)
    ref_pool, new_pool = base / f"reference-{ref_rows}", base / f"new-{new_rows}-of-{ref_rows}"
    write_shards(ref_pool, ref_rows, lambda rng, s, start, n: _shard(rng, s, start, n, ref_rows))
    write_shards(new_pool, new_rows, lambda rng, s, start, n: new_shard(rng, s, start, n, ref_rows), seed=1)
    ref_out = base / f"reference-out-{ref_rows}"
    if not (ref_out / "index" / "index.json").exists():
        print(f"reference run on {ref_rows:,} rows (not timed)", flush=True)
        run(ref_pool, ref_out, [{"dedup": {"method": "exact"}}])
    indexed = json.loads((ref_out / "index" / "index.json").read_text())["rows"]
    index_bytes = sum(p.stat().st_size for p in (ref_out / "index").iterdir() if p.is_file())
    blocks = ref_out / "index" / "blocks-d6"
    shutil.rmtree(blocks, ignore_errors=True)
    # the reference's block tables, made once (the first run against it makes them): timed apart
    make = (
        "from filtering.dedup import index as ix, ref_blocks; "
        f"print(ref_blocks.build(ix.read_reference({str(ref_out)!r}, {str(ref_out / 'index')!r}), 6))"
    )
    bw, bc, br, _ = timed([sys.executable, "-c", make])
    block_bytes = sum(p.stat().st_size for p in blocks.iterdir())
    print(
        f"block tables (made once): wall {bw:.1f} s  CPU {bc:.1f} s  peak RSS {br / 1e6:.0f} MB  "
        f"{block_bytes / 1e6:.1f} MB ({block_bytes / max(indexed, 1):.0f} B/row)",
        flush=True,
    )
    plain = [{"dedup": {"method": "exact"}}, {"dedup": {"method": "perceptual", "max_distance": 6}}]
    against = [{"dedup": {**f["dedup"], "against": [str(ref_out)]}} for f in plain]
    results = {}
    for name, filters in (("without", plain), ("against", against)):
        wall, cpu, rss, manifest = run(new_pool, base / f"new-out-{name}", filters)
        results[name] = (wall, cpu, rss, manifest)
        reasons = [f["reasons"] for f in manifest["counts"]["filters"]]
        print(f"{name:<8} wall {wall:7.1f} s  CPU {cpu:7.1f} s  peak RSS {rss / 1e6:7.0f} MB  {reasons}", flush=True)
        print(f"{'':<8} {_phases(manifest)}", flush=True)
    (w0, c0, r0, _), (w1, c1, r1, m1) = results["without"], results["against"]
    plan = m1.get("execution", {}).get("plan", "memory")
    print()
    print(
        f"reference: {indexed:,} kept rows, index {index_bytes / 1e6:.1f} MB ({index_bytes / max(indexed, 1):.0f} B/row)"
    )
    print(f"new pool: {new_rows:,} rows; plan {plan}; load {os.getloadavg()[0]:.1f} (1-min average, at the end)")
    print(f"{'':<10}{'without':>10}{'against':>10}{'ratio':>8}   target")
    print(f"{'wall s':<10}{w0:>10.1f}{w1:>10.1f}{w1 / w0:>8.2f}   <= 2.00")
    print(
        f"{'CPU s':<10}{c0:>10.1f}{c1:>10.1f}{c1 / c0:>8.2f}   (the wall's share of a loaded machine varies; CPU less)"
    )
    extra = (r1 - r0) / max(indexed, 1)
    print(f"{'RSS MB':<10}{r0 / 1e6:>10.0f}{r1 / 1e6:>10.0f}{r1 / r0:>8.2f}   +{extra:.1f} B per reference row (<= 16)")


def _phases(manifest: dict) -> str:
    """The run's seconds per dedup search (the manifest's ``stages.dedup`` records) and per phase."""
    searches = manifest.get("stages", {}).get("dedup", {})
    phases = manifest.get("execution", {}).get("seconds", {})
    return (
        "searches "
        + ", ".join(f"{k} {v.get('seconds', 0):.1f} s" for k, v in searches.items())
        + ("; phases " + ", ".join(f"{k} {v:.1f} s" for k, v in phases.items()))
    )


if __name__ == "__main__":
    main()
