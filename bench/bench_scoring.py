"""Scoring throughput: poolsift's scoring stage vs the model alone, open_clip's own pipeline and a straightforward loop.

One run prints, for each model and on the same shards:
- ceiling: the model's forward pass alone (image + trimmed text, auto precision) on
  tensors already decoded, resized and tokenized in memory;
- poolsift: ``score_stream`` end to end, with the shipped defaults (full-size decoding,
  ``precision: auto``) — tar reading, sha256, decode + resize + the phash scorer in
  worker processes, uint8 transfer, normalization and forward on the device;
- open_clip's own pipeline: ``open_clip.create_model_and_transforms`` (same weights), its
  ``preprocess`` and tokenizer over ``webdataset`` as open_clip_train's data loader reads
  shards (``decode("pilrgb")``), a torch ``DataLoader`` with as many worker processes as
  poolsift's decode workers, ``encode_image`` / ``encode_text``, fp32; its scores are
  compared with poolsift's fp32 scores (they should be equal);
- straightforward: PIL decode per image, the model's full preprocess, fp32, text padded
  to the full context, no workers, the same batch size (no phash: it does less work);
- precision: auto-precision and forced-bf16 CLIP scores against fp32 (max / mean abs
  difference, top-30% selection overlap).

JPEG draft decoding (``model.jpeg_draft``, opt-in) has its own bench, bench/bench_jpeg_draft.py.

Models: (a) the bundled tiny model over the bundled sample, (b) ViT-B-32 with random
weights (seed 0) over synthetic 512x384 JPEG shards written to --tmp (weights do not
change speed).

    .venv/bin/python bench/bench_scoring.py [--only tiny|vit] [--workers 1] [--batch-size 64]

``--stream-only`` times the ceiling and poolsift's stage only (no open_clip, loop or
precision runs); ``--code DIR`` times the poolsift code of another checkout (an older
commit's worktree) with this script and this tree's data, so two commits can be compared
in interleaved runs::

    .venv/bin/python bench/bench_scoring.py --only tiny --stream-only --code /path/to/old-worktree

On a GPU (``--device cuda``) the same comparison runs with the model on the GPU. Decode
workers default to all cores but one, as in ``poolsift run``. The GPU's mean utilisation
during poolsift's run is printed too, sampled with ``nvidia-smi``. Give it enough data to
reach a steady state, for example::

    python bench/bench_scoring.py --only vit --device cuda --batch-size 256 --shards 16 --per-shard 2048
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

WORDS = [
    "a",
    "photo",
    "of",
    "the",
    "red",
    "small",
    "large",
    "dog",
    "cat",
    "tree",
    "house",
    "car",
    "on",
    "in",
    "with",
    "near",
    "blue",
    "green",
    "sunny",
    "street",
    "beach",
    "old",
    "new",
    "wooden",
    "table",
    "chair",
    "window",
    "painting",
    "abstract",
    "city",
    "night",
    "mountain",
    "river",
    "boat",
    "bike",
    "flower",
    "garden",
]


def synthetic_shards(out: Path, shards: int, per_shard: int, size: tuple[int, int], seed: int = 0) -> list[str]:
    """Write JPEG shards of smooth random scenes with mixed-length captions (cached by name),
    img2dataset-like: ``KEY.jpg``, ``KEY.txt`` and ``KEY.json`` (uid, key, url, status, size)."""
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    urls = []
    w, h = size
    for s in range(shards):
        path = out / f"{w}x{h}-{per_shard}-{s:05d}.tar"
        urls.append(str(path))
        if path.exists():
            continue
        tmp = path.with_suffix(".tmp")
        with tarfile.open(tmp, "w") as tf:
            for i in range(per_shard):
                low = rng.uniform(0, 255, (h // 32 + 1, w // 32 + 1, 3)).astype(np.uint8)
                base = np.asarray(Image.fromarray(low).resize((w, h), Image.BICUBIC), dtype=np.int16)
                img = np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)
                buf = io.BytesIO()
                Image.fromarray(img).save(buf, "JPEG", quality=90)
                caption = " ".join(rng.choice(WORDS, rng.integers(3, 40)))
                key = f"{s:05d}{i:05d}"
                meta = {"uid": f"{s:016x}{i:016x}", "key": key, "url": f"https://example.com/{key}.jpg"}
                meta = json.dumps({**meta, "status": "success", "original_width": w, "original_height": h}).encode()
                for ext, data in (("jpg", buf.getvalue()), ("txt", caption.encode()), ("json", meta)):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
        tmp.rename(path)
    return urls


class GpuUtilisation:
    """Mean GPU utilisation (%) over a block, sampled by ``nvidia-smi`` every 0.2 s."""

    def __init__(self, device: str):
        self.samples: list[float] = []
        self.main_cpu_per_sample = float("nan")
        self.enabled = device.startswith("cuda") and shutil.which("nvidia-smi") is not None
        index = device.split(":", 1)[1] if ":" in device else "0"
        self.cmd = [
            "nvidia-smi",
            "-i",
            index,
            "--query-gpu=utilization.gpu",
            "--format=csv,noheader,nounits",
            "-lms",
            "200",
        ]

    def __enter__(self):
        if self.enabled:
            self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            self.reader = threading.Thread(target=self._read, daemon=True)
            self.reader.start()
        return self

    def _read(self) -> None:
        for line in self.proc.stdout:
            with contextlib.suppress(ValueError):
                self.samples.append(float(line.strip()))

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self.proc.terminate()
            self.proc.wait()
            self.reader.join(timeout=2)

    def __str__(self) -> str:
        if not self.samples:
            return "n/a"
        return f"{np.mean(self.samples):.0f}% mean, {np.percentile(self.samples, 10):.0f}% at the 10th percentile"


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)


def run_stream(
    urls, clip, batch_size, workers, draft, util: GpuUtilisation | None = None
) -> tuple[float, np.ndarray, int]:
    import resource

    import pyarrow as pa

    from filtering.scorers.base import InputInfo
    from filtering.scorers.clip import ClipParams, ClipScorer
    from filtering.scorers.phash import PhashScorer
    from filtering.stages.image_decode import DecodePlan
    from filtering.stages.webdataset import score_stream

    info = InputInfo("webdataset")
    scorer = ClipScorer(ClipParams(arch=clip.info.get("arch", "bench"), precision=clip.precision), info)
    scorer.attach(clip)  # the run's path: the CLIP scorer on a loaded model, the phash scorer in the workers
    phash = PhashScorer(PhashScorer.Params(), info)
    plan = DecodePlan(draft, [phash], {scorer.name: clip.pil_transform}, required=frozenset({scorer.name, phash.name}))
    # Arrow's first conversion in a process imports pandas (about 0.3 s): a run pays it at
    # its first cached shard, before the scorer protocol as after; reading the scores
    # through ShardScores.results would charge it to the first timed run here.
    pa.array([0.0])
    if util is not None:
        util.__enter__()
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    scores = []
    try:
        for shard in score_stream(urls, plan, [scorer], batch_size, workers):
            scores += shard.results(scorer, len(shard.rows), [])[0]["clip_score"].to_pylist()
        _sync(clip.device)
    finally:
        if util is not None:
            util.__exit__()
    dt = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    arr = np.array([np.nan if s is None else s for s in scores], np.float64)
    if util is not None:  # the main process's own CPU (reading, hashing, batching; the model's too on a CPU)
        util.main_cpu_per_sample = (r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime) / max(1, len(arr))
    return len(arr) / dt, arr, len(arr)


def run_ceiling(urls, clip, batch_size) -> float:
    """The forward pass alone, on inputs decoded and tokenized beforehand."""
    from filtering.io.reader import iter_shard
    from filtering.scorers.clip import ClipEncoder
    from filtering.stages.image_decode import decode_image, reference_plan

    encoder = ClipEncoder(clip)
    plan = reference_plan(clip.pil_transform)
    pixels, captions = [], []
    for url in urls:
        for s in iter_shard(url):
            d = decode_image(s.image, plan.required, plan)
            if d.error is None:
                pixels.append(d.pixels["clip"])
                captions.append(s.caption)
    batches = []
    for i in range(0, len(pixels), batch_size):
        tokens = clip.tokenizer(captions[i : i + batch_size])
        batches.append((np.stack(pixels[i : i + batch_size]), tokens))
    import torch

    from filtering.scorers.clip import token_length

    device = clip.device
    batches = [(torch.from_numpy(x).to(device), t.to(device)) for x, t in batches]  # already on the device
    _sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for x, tokens in batches:
            n = token_length(tokens)
            img, txt = encoder._forward(x, tokens[:, :n], n)
            img.cpu().numpy()
    _sync(device)
    return len(pixels) / (time.perf_counter() - t0)


def run_straightforward(urls, clip, batch_size) -> float:
    """PIL decode per image, full preprocess, fp32, padded text, no workers."""
    import torch
    from PIL import Image
    from torchvision.transforms import Compose, ToTensor

    from filtering.io.reader import iter_shard

    preprocess = Compose([clip.pil_transform, ToTensor(), clip.tensor_transform])
    model, n = clip.model, 0
    t0 = time.perf_counter()

    def encode(images, captions):
        with torch.no_grad():
            img = model.encode_image(torch.stack(images).to(clip.device), normalize=True)
            txt = model.encode_text(clip.tokenizer(captions).to(clip.device), normalize=True)
            return (img * txt).sum(-1).cpu().numpy()

    for url in urls:
        images, captions = [], []
        for s in iter_shard(url):
            n += 1
            try:
                images.append(preprocess(Image.open(io.BytesIO(s.image)).convert("RGB")))
                captions.append(s.caption)
            except Exception:  # noqa: BLE001 — a corrupt image is skipped, as a loop would
                continue
            if len(images) == batch_size:
                encode(images, captions)
                images, captions = [], []
        if images:
            encode(images, captions)
    return n / (time.perf_counter() - t0)


def run_open_clip(urls, clip, batch_size, workers) -> tuple[float, np.ndarray]:
    """open_clip's own pipeline on the same weights: ``create_model_and_transforms``, its
    ``preprocess`` and tokenizer over webdataset as open_clip_train's loader reads shards,
    a ``DataLoader`` with ``workers`` processes, fp32, normalised dot product. Returns
    samples/s (model creation excluded, as poolsift's model loading is) and the scores of
    the images it could read, in shard order."""
    import open_clip
    import torch
    import webdataset as wds

    name = clip.info["arch"]
    pretrained = clip.info.get("pretrained")
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained, device=clip.device)
    if not pretrained:  # random weights: the same ones poolsift's model holds
        model.load_state_dict(clip.model.state_dict())
    model.eval()
    tokenizer = open_clip.get_tokenizer(name)
    dataset = (
        wds.WebDataset(urls, shardshuffle=False, handler=wds.ignore_and_continue)
        .decode("pilrgb", handler=wds.ignore_and_continue)
        .rename(image="jpg;png;jpeg;webp", text="txt", handler=wds.ignore_and_continue)
        .map_dict(image=preprocess, text=lambda text: tokenizer(text)[0], handler=wds.ignore_and_continue)
        .to_tuple("image", "text")
        .batched(batch_size, partial=True)
    )
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers)
    scores = []
    t0 = time.perf_counter()
    with torch.no_grad():
        for images, texts in loader:
            img = model.encode_image(images.to(clip.device), normalize=True)
            txt = model.encode_text(texts.to(clip.device), normalize=True)
            scores.append((img * txt).sum(-1).float().cpu().numpy())
    _sync(clip.device)
    arr = np.concatenate(scores).astype(np.float64)
    return len(arr) / (time.perf_counter() - t0), arr


def compare(a: np.ndarray, b: np.ndarray, fraction: float = 0.3) -> str:
    ok = ~(np.isnan(a) | np.isnan(b))
    a, b = a[ok], b[ok]
    k = max(1, int(len(a) * fraction))
    top_a, top_b = set(np.argsort(-a)[:k]), set(np.argsort(-b)[:k])
    d = np.abs(a - b)
    overlap = len(top_a & top_b) / k
    return f"max |d| {d.max():.2g}  mean |d| {d.mean():.2g}  top-{int(fraction * 100)}% overlap {overlap:.1%}"


def bench_model(title, clip, urls, batch_size, workers, stream_only: bool = False) -> None:
    fp32 = dataclasses.replace(clip, precision="fp32")
    bf16 = dataclasses.replace(clip, precision="bf16")
    print(
        f"\n== {title}: {len(urls)} shards, batch {batch_size}, {workers} decode worker(s), "
        f"torch threads {_threads()}, precision auto -> {clip.precision}",
        flush=True,
    )
    ceiling = run_ceiling(urls, clip, batch_size)
    util = GpuUtilisation(clip.device)
    ours, s_auto, n = run_stream(urls, clip, batch_size, workers, None, util)
    if stream_only:
        print(f"samples                          {n}")
        print(f"ceiling (forward only)           {ceiling:8.1f} samples/s")
        print(f"poolsift score_stream            {ours:8.1f} samples/s   {ours / ceiling:5.2f}x of ceiling")
        return
    reference, s_ref = run_open_clip(urls, fp32, batch_size, workers)
    base = run_straightforward(urls, fp32, batch_size)
    _, s_fp32, _ = run_stream(urls, fp32, batch_size, workers, None)
    _, s_bf16, _ = run_stream(urls, bf16, batch_size, workers, None)
    print(f"samples                          {n}")
    print(f"ceiling (forward only)           {ceiling:8.1f} samples/s")
    print(f"poolsift score_stream            {ours:8.1f} samples/s   {ours / ceiling:5.2f}x of ceiling")
    print(f"open_clip's pipeline (fp32)      {reference:8.1f} samples/s   poolsift = {ours / reference:5.2f}x")
    print(f"straightforward loop (fp32)      {base:8.1f} samples/s   poolsift = {ours / base:5.2f}x")
    if clip.device.startswith("cuda"):
        print(f"GPU utilisation during poolsift  {util}")
        cpu = util.main_cpu_per_sample
        print(
            f"main process CPU per sample      {cpu * 1e6:8.0f} us (alone it caps the stage at {1 / cpu:,.0f} samples/s)"
        )
    readable = s_fp32[~np.isnan(s_fp32)]
    if len(readable) == len(s_ref):
        print(f"poolsift fp32 vs open_clip's     {compare(readable, s_ref)}")
    else:
        print(f"poolsift fp32 vs open_clip's     not compared: {len(readable)} scores against {len(s_ref)}")
    print(f"{f'auto ({clip.precision}) vs fp32 scores':33}{compare(s_auto, s_fp32)}")
    print(f"bf16 (forced) vs fp32 scores     {compare(s_bf16, s_fp32)}")


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=("tiny", "vit"))
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument(
        "--workers", type=int, default=None, help="decode processes (default: 1 on a CPU, all cores but one on a GPU)"
    )
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--per-shard", type=int, default=256)
    ap.add_argument("--tmp", default="/tmp/poolsift_bench")
    ap.add_argument("--stream-only", action="store_true", help="time the ceiling and poolsift's stage only")
    ap.add_argument("--code", help="a checkout whose filtering/ is timed instead of this tree's")
    args = ap.parse_args()
    if args.code:  # before the first import of filtering; the decode workers inherit it too
        code = str(Path(args.code).resolve())
        sys.path.insert(0, code)
        os.environ["PYTHONPATH"] = os.pathsep.join([code, *filter(None, [os.environ.get("PYTHONPATH")])])
    if args.workers is None:
        args.workers = max(1, (os.cpu_count() or 2) - 1) if args.device.startswith("cuda") else 1
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from filtering.io.paths import expand_shards
    from filtering.models.clip import load_clip

    print(f"poolsift code: {Path(sys.modules['filtering'].__file__).parent.parent}")
    print(
        f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}, "
        f"{os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    )
    tmp = Path(args.tmp)
    ckpt = REPO / "sample_data/tiny_clip/poolsift-tiny.safetensors"
    if args.only in (None, "tiny") and not ckpt.is_file():
        print("bundled sample missing (poolsift make-sample sample_data): skipping the tiny model")
    elif args.only in (None, "tiny"):
        urls = expand_shards(str(REPO / "sample_data/pool/{00000..00003}.tar"))
        clip = load_clip("poolsift-tiny", str(ckpt), args.device, "auto")
        bench_model(
            "poolsift-tiny (bundled) on the bundled sample", clip, urls, args.batch_size, args.workers, args.stream_only
        )
    if args.only in (None, "vit"):
        import torch

        torch.manual_seed(0)
        clip = load_clip("ViT-B-32", None, args.device, "auto")
        urls = synthetic_shards(tmp, args.shards, args.per_shard, (512, 384))
        bench_model(
            "ViT-B-32 (random weights) on synthetic 512x384 JPEGs",
            clip,
            urls,
            args.batch_size,
            args.workers,
            args.stream_only,
        )
    print(f"load average after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
