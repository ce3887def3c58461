"""Embedding-head throughput: rows/s of the aesthetic head over 1M ViT-L/14 embeddings.

Times the ``embedding_head`` scorer with the public aesthetic predictor's architecture
(``laion_aesthetic``: Linear 768-1024-128-64-16-1, random weights) on float16 768-d
embeddings, as DataComp's ``l14_img`` arrays hold them, in blocks of the scorer loop's
batch size, and side by side:

- numpy, as the scorer runs it: the five activation-free Linear layers multiplied out
  once into one affine map (``fold``);
- numpy layer by layer (no folding);
- torch, layer by layer (``backend: torch``, CPU);
- the straightforward loop of the public ``simple_inference.py``: normalise and call
  the torch model one row at a time (timed on ``--loop-rows`` rows).

The layer-by-layer paths are timed on ``--slow-rows`` rows (they cost ~1.6 GFLOP per
thousand rows); every figure is rows per second. Checks that all paths agree to 1e-4.

    .venv/bin/python bench/bench_heads.py                 # 1,000,000 rows
    .venv/bin/python bench/bench_heads.py --rows 200000
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from filtering.pool import ShardPart
from filtering.registry import parse_scorers
from filtering.scorers.base import BATCH_ROWS, Batch, InputInfo

SHAPES = {
    "layers.0": (1024, 768),
    "layers.2": (128, 1024),
    "layers.4": (64, 128),
    "layers.6": (16, 64),
    "layers.7": (1, 16),
}


def weights(path: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    sd = {}
    for name, (out, inp) in SHAPES.items():
        sd[f"{name}.weight"] = (rng.standard_normal((out, inp)) / np.sqrt(inp)).astype(np.float32)
        sd[f"{name}.bias"] = (0.1 * rng.standard_normal(out)).astype(np.float32)
    save_file(sd, str(path))
    return path


def scorer(path: Path, backend: str):
    [s] = parse_scorers(
        [
            {
                "embedding_head": {
                    "name": "aesthetic",
                    "preset": "laion_aesthetic",
                    "weights": str(path),
                    "backend": backend,
                }
            }
        ],
        InputInfo("datacomp", {"l14_img": 768}),
    )
    s.ensure_setup()
    return s


def rate(fn, block: np.ndarray, rows: int) -> tuple[float, np.ndarray]:
    """Rows/s of ``fn`` over ``rows`` rows, fed ``block`` (float16) repeatedly in batches."""
    done, first = 0, None
    t = time.perf_counter()
    while done < rows:
        n = min(len(block), rows - done)
        out = fn(block[:n])
        first = out if first is None else first
        done += n
    return rows / (time.perf_counter() - t), first


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--slow-rows", type=int, default=262_144)
    ap.add_argument("--loop-rows", type=int, default=5_000)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    a = ap.parse_args()
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    rng = np.random.default_rng(1)
    block = rng.standard_normal((BATCH_ROWS, 768)).astype(np.float16)  # DataComp stores float16
    part = ShardPart("bench", "bench", 0, BATCH_ROWS)
    with tempfile.TemporaryDirectory() as tmp:
        path = weights(Path(tmp) / "aesthetic.safetensors")
        fast, slow_t = scorer(path, "numpy"), scorer(path, "torch")
        head = fast._model_head

        def call(s):
            return lambda x: s.score(Batch(part, 0, np.asarray(x, np.float32)))[s.column]

        from filtering.scorers.embedding_head import forward_numpy

        rows_np, ref = rate(call(fast), block, a.rows)
        rows_layers, out_layers = rate(lambda x: forward_numpy(head, x), block, a.slow_rows)
        rows_torch, out_torch = rate(call(slow_t), block, a.slow_rows)

        model = torch.nn.Sequential(
            torch.nn.Linear(768, 1024),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(1024, 128),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(128, 64),
            torch.nn.Dropout(0.1),
            torch.nn.Linear(64, 16),
            torch.nn.Linear(16, 1),
        )
        from safetensors.torch import load_file

        model.load_state_dict({k.removeprefix("layers."): v for k, v in load_file(str(path)).items()})
        model.eval()

        def loop(x):  # simple_inference.py: normalise with numpy, one torch call per image
            out = []
            for row in x:
                v = row.astype(np.float32)[None]
                v = v / np.linalg.norm(v, axis=1, keepdims=True)
                with torch.no_grad():
                    out.append(float(model(torch.from_numpy(v))[0, 0]))
            return np.array(out, np.float32)

        rows_loop, out_loop = rate(loop, block[: a.loop_rows], a.loop_rows)
    n = a.loop_rows
    for name, other in (("layers", out_layers), ("torch", out_torch), ("loop", out_loop)):
        np.testing.assert_allclose(other[:n], ref[:n], atol=1e-4, err_msg=name)
    print(f"aesthetic head (768-1024-128-64-16-1) over float16 768-d embeddings, batches of {BATCH_ROWS:,}")
    print(f"{'path':<36}{'rows':>12}{'rows/s':>14}{'vs loop':>10}")
    for name, rows, r in (
        ("numpy, folded (the scorer)", a.rows, rows_np),
        ("numpy, layer by layer", a.slow_rows, rows_layers),
        ("torch CPU, layer by layer", a.slow_rows, rows_torch),
        ("per-row torch loop (public script)", a.loop_rows, rows_loop),
    ):
        print(f"{name:<36}{rows:>12,}{r:>14,.0f}{r / rows_loop:>9.0f}x")
    print(
        f"1M rows: numpy folded {1e6 / rows_np:.2f} s, torch {1e6 / rows_torch:.1f} s, loop {1e6 / rows_loop / 60:.1f} min"
    )


if __name__ == "__main__":
    main()
