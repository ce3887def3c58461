"""poolsift at pool scale (issue 16): DataComp-format pools of 1.6M, 6.4M and 25.6M rows.

Generates parquet-only DataComp metadata (uid, url, text, original size, B/32 and L/14
scores, sha256; shards of 100,000 rows; vectorised, cached under ``--dir`` so later runs
reuse it) and times, per size, each as a whole process tree:

- ``poolsift run`` with ``clip_score: {top_fraction: 0.3}`` on L/14, writing the subset
  parquet, subset.npy, the dropped rows and the manifest (on the shard plan, as every run);
- ``script``, issue 16's straightforward script: 2 worker processes read uid + score per
  shard with pyarrow, the driver takes DataComp's threshold over all scores, the workers
  keep the rows over it with one Python ``int()`` per kept uid half, the driver sorts
  and saves subset.npy. It writes subset.npy only;
- ``datacomp``: DataComp's own ``clip_score`` baseline, ported from its source
  (mlfoundations/datacomp ``baselines/apply_filter.py``: ``get_threshold``,
  ``load_uids_with_clip_score_helper``, ``worker_threadpool``, then ``uids.sort()`` and
  ``np.save``): pandas ``read_parquet`` through fsspec on a 2-process pool. subset.npy only;
- ``floor``: the least a program can do to write what poolsift writes, without its
  checks, hashes, manifest or provenance: 2 workers read the scores, the driver takes
  the threshold, each worker reads its shard's every column once, writes the kept rows
  as Parquet (pyarrow's defaults) and the dropped rows' uid and reason, and returns the
  kept uids decoded by numpy; the driver sorts and saves subset.npy. It bounds from below
  what any tool writing the subset tables can reach.

Printed per size: wall and CPU seconds (children included), peak RSS of the whole
process tree (sum over its processes, sampled every 20 ms) and PSS (shared pages split
between processes), bytes of peak RSS per input row, each contender's wall and CPU
over poolsift's (above 1: poolsift is faster), and whether its uid set is identical.

    .venv/bin/python bench/bench_scale.py --dir /tmp/poolsift-scale --sizes 1.6M 6.4M
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from bench.bench_datacomp import metadata_table  # noqa: E402

KEY = "clip_l14_similarity_score"
FRACTION = 0.3
SHARD_ROWS = 100_000

SCRIPT = """
import glob, sys
from multiprocessing import Pool
import numpy as np, pyarrow.parquet as pq
meta, out, key, fraction = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])

def scores(path):
    return pq.read_table(path, columns=[key]).column(key).to_numpy()

def kept(args):
    path, threshold = args
    t = pq.read_table(path, columns=["uid", key])
    uids = t.column("uid").to_numpy(zero_copy_only=False)[t.column(key).to_numpy() >= threshold]
    return np.array([(int(u[:16], 16), int(u[16:32], 16)) for u in uids], np.dtype("u8,u8"))

if __name__ == "__main__":
    paths = sorted(glob.glob(meta + "/*.parquet"))
    with Pool(2) as pool:
        s = np.concatenate(pool.map(scores, paths))
        threshold = -np.sort(-s)[int(len(s) * fraction)]
        uids = np.concatenate(pool.map(kept, [(p, threshold) for p in paths]))
    uids.sort()
    np.save(out, uids)
"""

# DataComp's clip_score baseline (baselines/apply_filter.py), its functions as written there
# less the gcld3 branch and tqdm; the entry point as apply_filter() runs it.
DATACOMP = """
import sys
from functools import partial
from multiprocessing import Pool
import fsspec, numpy as np, pandas as pd
meta, out, key, fraction = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])

def worker_threadpool(worker_fn, concat_fn, paths, n_workers):
    with Pool(n_workers) as pool:
        uids = []
        for u in pool.imap_unordered(worker_fn, paths):
            uids.append(u)
    return concat_fn(uids)

def load_metadata(metadata_dir_path, num_workers, columns=None):
    fs, url = fsspec.core.url_to_fs(metadata_dir_path)
    parquet_paths = [str(x) for x in fs.ls(url) if ".parquet" in x]
    worker = partial(pd.read_parquet, columns=columns, filesystem=fs)
    return worker_threadpool(worker, pd.concat, parquet_paths, num_workers)

def get_threshold(metadata_dir_path, key, fraction, num_workers):
    df = load_metadata(metadata_dir_path, num_workers=num_workers, columns=[key])
    n = int(len(df) * fraction)
    return -np.sort(-df[key].values)[n]

def load_uids_with_clip_score_helper(fs_url, key, threshold):
    fs, url = fs_url
    df = pd.read_parquet(url, columns=["uid", key], filesystem=fs)
    return np.array(
        [(int(uid[:16], 16), int(uid[16:32], 16)) for uid in df[df[key] >= threshold]["uid"].values],
        np.dtype("u8,u8"),
    )

def load_uids_with_clip_score(metadata_dir_path, key, fraction, num_workers):
    threshold = get_threshold(metadata_dir_path, key, fraction, num_workers)
    fs, url = fsspec.core.url_to_fs(metadata_dir_path)
    parquet_paths = [(fs, str(x)) for x in fs.ls(url) if ".parquet" in x]
    worker = partial(load_uids_with_clip_score_helper, key=key, threshold=threshold)
    return worker_threadpool(worker, np.concatenate, parquet_paths, num_workers)

if __name__ == "__main__":
    uids = load_uids_with_clip_score(meta, key, fraction, 2)
    uids.sort()
    np.save(out, uids)
"""

# What writing poolsift's outputs costs at the least: one read of every column, the
# kept rows and the dropped uids written with pyarrow's defaults, uids decoded by numpy.
FLOOR = """
import glob, os, sys
from multiprocessing import Pool
import numpy as np, pyarrow as pa, pyarrow.compute as pc, pyarrow.parquet as pq
meta, out, key, fraction = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
folder = out + ".parts"
NIBBLE = np.zeros(256, np.uint64)
NIBBLE[np.frombuffer(b"0123456789abcdef", np.uint8)] = np.arange(16, dtype=np.uint64)
SHIFTS = np.uint64(4) * np.arange(15, -1, -1, dtype=np.uint64)

def scores(path):
    return pq.read_table(path, columns=[key], use_threads=False).column(key).to_numpy()

def write(args):
    i, path, threshold = args
    t = pq.read_table(path, use_threads=False)
    keep = pa.array(t.column(key).to_numpy() >= threshold)
    pq.write_table(t.filter(keep), f"{folder}/subset-{i:05d}.parquet")
    dropped = t.select(["uid"]).filter(pc.invert(keep))
    reason = pa.DictionaryArray.from_arrays(pa.array(np.zeros(dropped.num_rows, np.int32)), pa.array(["below"]))
    pq.write_table(dropped.append_column("reason", reason), f"{folder}/dropped-{i:05d}.parquet")
    u = t.column("uid").filter(keep).combine_chunks()
    offsets = np.frombuffer(u.buffers()[1], np.int32, len(u) + 1, u.offset * 4)
    digits = NIBBLE[np.frombuffer(u.buffers()[2], np.uint8)[offsets[0] : offsets[-1]].reshape(-1, 2, 16)]
    halves = (digits << SHIFTS).sum(axis=2, dtype=np.uint64)
    uids = np.empty(len(u), np.dtype("u8,u8"))
    uids["f0"], uids["f1"] = halves[:, 0], halves[:, 1]
    return uids

if __name__ == "__main__":
    paths = sorted(glob.glob(meta + "/*.parquet"))
    os.makedirs(folder, exist_ok=True)
    with Pool(2) as pool:
        s = np.concatenate(pool.map(scores, paths))
        threshold = -np.sort(-s)[int(len(s) * fraction)]
        uids = np.concatenate(pool.map(write, [(i, p, threshold) for i, p in enumerate(paths)]))
    uids.sort()
    np.save(out, uids)
"""


def parse_size(text: str) -> int:
    t = text.upper()
    scale = 1_000_000 if t.endswith("M") else 1_000 if t.endswith("K") else 1
    return int(float(t.rstrip("MK")) * scale)


def write_shards(root: Path, rows: int, make_table, seed: int = 0, shard_rows: int = SHARD_ROWS) -> None:
    """``rows`` rows as parquet shards of ``shard_rows``; ``make_table(rng, s, start, n)`` gives
    shard ``s`` (rows ``start`` to ``start + n``), from its own seeded ``rng``. A shard whose
    parquet exists is kept: written last, through a temporary name, it marks the shard done."""
    import pyarrow.parquet as pq

    root.mkdir(parents=True, exist_ok=True)
    for s, start in enumerate(range(0, rows, shard_rows)):
        path = root / f"{s:08d}.parquet"
        if path.exists():
            continue
        n = min(shard_rows, rows - start)
        table = make_table(np.random.default_rng([seed, s]), s, start, n)
        tmp = path.with_suffix(".tmp")
        pq.write_table(table, tmp)
        tmp.rename(path)


def generate(root: Path, rows: int, seed: int = 0) -> None:
    """``rows`` rows in shards of SHARD_ROWS, no npz (nothing here reads embeddings)."""

    def shard(rng, s, start, n):
        return metadata_table(rng, n, score_dtype=np.float64, faces=False)  # float64, as bench_datacomp notes

    write_shards(root, rows, shard, seed)


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def _memory(pids: list[int]) -> tuple[int, int]:
    rss = pss = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Rss:"):
                        rss += int(line.split()[1]) * 1024
                    elif line.startswith("Pss:"):
                        pss += int(line.split()[1]) * 1024
        except OSError:
            continue
    return rss, pss


def _cpu(pids: list[int], seen: dict[int, float]) -> None:
    """Record each process's own CPU seconds (user + system) as last seen: a process whose
    parent outlives the measured one (a forkserver's workers) is never reaped into it."""
    tick = os.sysconf("SC_CLK_TCK")
    for p in pids:
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            seen[p] = (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError, ValueError):
            continue


def timed(cmd: list[str]) -> tuple[float, float, float, float]:
    """Wall s, CPU s (children included), peak summed RSS and PSS (bytes) of a process tree.

    CPU: the larger of what ``wait4`` reports (the process and the children it reaped)
    and the sum over every process seen in the tree of its own CPU time, sampled with
    the memory (processes reaped by one that outlives the run are only seen there)."""
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONPATH": str(REPO)}
    peak = [0, 0]
    seen: dict[int, float] = {}
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    done = threading.Event()

    def sample():
        while not done.is_set():
            pids = _tree(proc.pid)
            rss, pss = _memory(pids)
            _cpu(pids, seen)
            peak[0], peak[1] = max(peak[0], rss), max(peak[1], pss)
            done.wait(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    done.set()
    sampler.join()
    stderr = proc.stderr.read().decode()
    proc.stderr.close()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd[:4])}... failed:\n{stderr}")
    return wall, max(usage.ru_utime + usage.ru_stime, sum(seen.values())), peak[0], peak[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", required=True, help="pools are generated (once) and runs written under this folder")
    ap.add_argument("--sizes", nargs="+", default=["1.6M", "6.4M", "25.6M"])
    ap.add_argument(
        "--contenders",
        nargs="+",
        default=["script", "datacomp", "floor"],
        choices=["script", "datacomp", "floor"],
        help="what poolsift is timed against",
    )
    ap.add_argument(
        "--repeat", type=int, default=1, help="runs of each contender, interleaved; the fastest is reported"
    )
    args = ap.parse_args()
    work = Path(args.dir)
    py = sys.executable
    rows_out = []
    for size in args.sizes:
        rows = parse_size(size)
        meta = work / f"pool-{rows}"
        t = time.perf_counter()
        generate(meta, rows)
        print(f"{size}: pool ready under {meta} ({time.perf_counter() - t:.0f} s)", file=sys.stderr)
        cfg = work / f"run-{rows}.yaml"
        cfg.write_text(
            f"input: {{datacomp_metadata: '{meta}'}}\n"
            f"filters:\n  - clip_score: {{top_fraction: {FRACTION}, field: {KEY}}}\n"
            f"output: {{dir: '{work / f'out-{rows}'}'}}\n"
        )
        for p in sorted(meta.glob("*.parquet")):  # page cache warm for both
            p.read_bytes()
        commands = {"poolsift run": [py, "-m", "pipelines.cli", "run", str(cfg), "--quiet"]}
        for name, code in (("script", SCRIPT), ("datacomp", DATACOMP), ("floor", FLOOR)):
            if name in args.contenders:
                commands[name] = [py, "-c", code, str(meta), str(work / f"{name}-{rows}.npy"), KEY, str(FRACTION)]
        runs = {name: [] for name in commands}
        for _ in range(args.repeat):
            for name, cmd in commands.items():
                runs[name].append(timed(cmd))
        best = {name: min(r) for name, r in runs.items()}
        ours = np.load(work / f"out-{rows}" / "subset.npy")
        same = {
            name: np.array_equal(ours, np.load(work / f"{name}-{rows}.npy"))
            for name in commands
            if name != "poolsift run"
        }
        rows_out.append((size, rows, best, same, len(ours)))
        print_table(rows_out, args)


def print_table(rows_out, args) -> None:
    print(
        f"\nclip_score L/14 top {FRACTION:.0%} on DataComp-format parquet; {os.cpu_count()} CPUs; "
        f"load average {os.getloadavg()[0]:.1f}; best of {args.repeat}"
    )
    print(
        f"{'rows':>7} {'contender':<13}{'wall s':>8}{'cpu s':>8}{'peak RSS MB':>13}{'PSS MB':>9}{'B/row':>7}"
        f"{'its wall / ours':>17}{'its cpu / ours':>16}  same uids"
    )
    for size, rows, best, same, kept in rows_out:
        wall0, cpu0 = best["poolsift run"][0], best["poolsift run"][1]
        for name, (wall, cpu, rss, pss) in best.items():
            ratios = f"{wall / wall0:>16.2f}x{cpu / cpu0:>15.2f}x" if name != "poolsift run" else " " * 33
            print(
                f"{size:>7} {name:<13}{wall:>8.1f}{cpu:>8.1f}{rss / 1e6:>13.0f}{pss / 1e6:>9.0f}{rss / rows:>7.0f}{ratios}"
                f"  {same.get(name, '')}"
            )
        print(f"{'':>7} kept {kept:,} rows")


if __name__ == "__main__":
    main()
