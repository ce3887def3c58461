"""Train the tiny watermark head that ships in ``sample_data/heads/``.

The bundled sample's quality shard (``sample_data/quality/00004.tar``) plants a
watermark-like text overlay (:mod:`filtering.sample.watermark`) on a known share of its
images. This script trains the head that finds it, the way ``train_tiny_clip`` trains
the CLIP: on fresh renders of the synthetic domain from their own seed stream, never
the sample itself, and through the scoring path's own steps (JPEG encoded at the
sample's qualities, decoded as reference images are, by ``decode_image`` under
``reference_plan``, encoded by the bundled tiny CLIP's ``ClipEncoder``), so training
sees what a run sees::

    python -m filtering.sample.train_quality_head

The head is an MLP ``64 -> 32 -> 1`` over the L2-normalised image embedding, ReLU
between the layers and a sigmoid on the output (the ``mlp`` preset of the
``embedding_head`` scorer with ``activation: relu, output: sigmoid``), stored as fp32
safetensors with keys ``layers.0.*`` and ``layers.2.*``, as ``nn.Sequential(Linear,
ReLU, Linear)`` names them. Full-batch Adam from ``torch.manual_seed(0)`` on one
thread: the same run gives the same weights. It prints held-out ROC-AUC on renders of
another seed (the shipped head: see ``sample_data/README.md``).
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import numpy as np

from filtering.sample import synth, watermark

TRAIN_SEED = 11  # the sample uses seed 0's streams; the tiny CLIP 5 and 99
EVAL_SEED = 12
HIDDEN = 32
OUT = Path("sample_data/heads/poolsift-watermark.safetensors")
CLIP_ARCH = "poolsift-tiny"
CLIP_WEIGHTS = "sample_data/tiny_clip/poolsift-tiny.safetensors"


def render_jpegs(n: int, rng: np.random.Generator, share: float = 0.5) -> tuple[list[bytes], np.ndarray]:
    """``n`` JPEGs drawn like the sample's (sizes, qualities), a ``share`` of them watermarked."""
    from filtering.sample.make import _QUALITY_RANGE, _normal_size

    jpegs, marked = [], np.zeros(n, dtype=bool)
    for i in range(n):
        scene = synth.random_scene(rng)
        width, height = _normal_size(rng)
        img = synth.render_scene(scene, width, height)
        if rng.random() < share:
            img = watermark.overlay(img, watermark.random_watermark(rng))
            marked[i] = True
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=int(rng.integers(_QUALITY_RANGE[0], _QUALITY_RANGE[1] + 1)), optimize=True)
        jpegs.append(buf.getvalue())
    return jpegs, marked


def embed(jpegs: list[bytes], batch_size: int = 256) -> np.ndarray:
    """Image embeddings as a run computes them: ``decode_image`` then ``ClipEncoder`` (fp32, CPU)."""
    from filtering.models.clip import load_clip
    from filtering.scorers.clip import ClipEncoder
    from filtering.stages.image_decode import decode_in_order, reference_plan

    clip = load_clip(CLIP_ARCH, CLIP_WEIGHTS, "cpu", "fp32")
    encoder = ClipEncoder(clip)
    plan = reference_plan(clip.pil_transform)
    out = []
    for lo in range(0, len(jpegs), batch_size):
        pixels = []
        for i, d in decode_in_order(enumerate(jpegs[lo : lo + batch_size], lo), plan, workers=0):
            if d.error is not None:
                raise RuntimeError(f"rendered image {i} did not decode: {d.error}")
            pixels.append(d.pixels["clip"])
        img, _ = encoder(np.stack(pixels), [""] * len(pixels))
        out.append(np.asarray(img, dtype=np.float32))
    return np.concatenate(out)


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Probability that a positive outranks a negative (ties count half)."""
    from scipy.stats import rankdata

    ranks = rankdata(scores)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def train(out: Path = OUT, n_train: int = 4000, n_eval: int = 1000, steps: int = 1500, lr: float = 1e-2) -> dict:
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    torch.set_num_threads(1)
    x_train, y_train = _data(n_train, TRAIN_SEED)
    x_eval, y_eval = _data(n_eval, EVAL_SEED)
    model = torch.nn.Sequential(torch.nn.Linear(x_train.shape[1], HIDDEN), torch.nn.ReLU(), torch.nn.Linear(HIDDEN, 1))
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-4)
    x, y = torch.from_numpy(x_train), torch.from_numpy(y_train.astype(np.float32))
    loss_fn = torch.nn.BCEWithLogitsLoss()
    for step in range(steps):
        loss = loss_fn(model(x).squeeze(1), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 250 == 0 or step == steps - 1:
            print(f"step {step + 1}/{steps} loss {loss.item():.4f}", flush=True)
    with torch.no_grad():
        p_train = torch.sigmoid(model(x).squeeze(1)).numpy()
        p_eval = torch.sigmoid(model(torch.from_numpy(x_eval)).squeeze(1)).numpy()
    out.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"layers.{k}": v.detach().float().contiguous() for k, v in model.state_dict().items()}
    # One metadata entry: safetensors writes several in no fixed order, and the file must be reproducible.
    about = {
        "preset": "mlp",
        "activation": "relu",
        "output": "sigmoid",
        "embedding": f"{CLIP_ARCH} image",
        "trained_by": "filtering.sample.train_quality_head",
    }
    save_file(tensors, str(out), metadata={"poolsift": json.dumps(about, sort_keys=True)})
    metrics = {
        "train_auc": round(roc_auc(p_train, y_train), 4),
        "eval_auc": round(roc_auc(p_eval, y_eval), 4),
        "eval_recall_at_0.5": round(float((p_eval[y_eval] >= 0.5).mean()), 4),
        "eval_clean_kept_at_0.5": round(float((p_eval[~y_eval] < 0.5).mean()), 4),
    }
    print(f"saved {out} ({out.stat().st_size} bytes); {metrics}", flush=True)
    return metrics


def _data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    jpegs, marked = render_jpegs(n, np.random.default_rng(seed))
    emb = embed(jpegs)
    return emb / np.linalg.norm(emb, axis=1, keepdims=True), marked


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the bundled watermark head on fresh renders.")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--train", type=int, default=4000)
    parser.add_argument("--steps", type=int, default=1500)
    a = parser.parse_args(argv)
    train(a.out, n_train=a.train, steps=a.steps)


if __name__ == "__main__":
    main()
