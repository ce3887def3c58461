"""Model loading: local files, hf-hub (from a local cache, offline), and tags share one code path."""

import hashlib
import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from filtering.errors import ConfigError, PoolsiftError
from filtering.models.clip import BUNDLED_CONFIG_DIR, load_clip, register_bundled_configs


@pytest.fixture(scope="module")
def random_tiny():
    import open_clip

    register_bundled_configs()
    torch.manual_seed(0)
    return open_clip.create_model("poolsift-tiny")


def _state(model):
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_local_safetensors_checkpoint(tmp_path, random_tiny):
    from safetensors.torch import save_file

    path = tmp_path / "tiny.safetensors"
    save_file(_state(random_tiny), str(path))
    clip = load_clip("poolsift-tiny", str(path), device="cpu", precision="fp32")
    assert _same_weights(clip.model, random_tiny)
    assert clip.info["checkpoint_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert clip.info["pretrained"] == str(path)


def test_local_torch_state_dict_is_loaded_without_unpickling_code(tmp_path, random_tiny):
    good = tmp_path / "tiny.pt"
    torch.save(_state(random_tiny), good)
    clip = load_clip("poolsift-tiny", str(good), device="cpu", precision="fp32")
    assert _same_weights(clip.model, random_tiny)

    class Evil:
        def __reduce__(self):
            return (print, ("arbitrary code ran",))

    bad = tmp_path / "evil.pt"
    with open(bad, "wb") as f:
        pickle.dump({"state_dict": Evil()}, f)
    with pytest.raises(PoolsiftError, match=r"evil.pt: refused: the checkpoint is a pickle holding"):
        load_clip("poolsift-tiny", str(bad), device="cpu", precision="fp32")


def test_hf_hub_checkpoint_from_local_cache_offline(tmp_path, random_tiny, monkeypatch):
    """`pretrained: hf-hub:org/name` goes through open_clip's hub loader; here the hub cache is
    pre-filled on disk and the hub is offline, so no network is touched."""
    import huggingface_hub.constants as hf_constants
    from safetensors.torch import save_file

    repo = tmp_path / "hub" / "models--poolsift--tiny"
    snap = repo / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(snap.name)
    model_cfg = json.loads((BUNDLED_CONFIG_DIR / "poolsift-tiny.json").read_text())
    (snap / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": {}}))
    save_file(_state(random_tiny), str(snap / "open_clip_model.safetensors"))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)

    clip = load_clip("ignored-when-hf-hub", "hf-hub:poolsift/tiny", device="cpu", precision="fp32")
    assert _same_weights(clip.model, random_tiny)
    assert (
        clip.info["checkpoint_sha256"]
        == hashlib.sha256((snap / "open_clip_model.safetensors").read_bytes()).hexdigest()
    )


def test_unknown_arch_and_tag_list_the_choices():
    with pytest.raises(ConfigError, match=r"model.arch: unknown architecture 'ViT-Q-99'. Available: \[.*ViT-B-32"):
        load_clip("ViT-Q-99", None, device="cpu")
    with pytest.raises(ConfigError, match=r"model.pretrained: 'no-such-tag'.*Known tags: \[.*openai"):
        load_clip("ViT-B-32", "no-such-tag", device="cpu")


def test_split_transform_composes_to_the_models_own_transform(random_tiny):
    import open_clip

    clip = load_clip("poolsift-tiny", None, device="cpu", precision="fp32")
    _, _, preprocess = open_clip.create_model_and_transforms("poolsift-tiny")
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (90, 130, 3), dtype=np.uint8))
    expected = preprocess(img)
    pixels = np.array(clip.pil_transform(img), dtype=np.uint8)
    got = clip.tensor_transform(torch.from_numpy(pixels).permute(2, 0, 1).float() / 255.0)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_precision_auto_resolution():
    from filtering.models.clip import cpu_supports_bf16, resolve_precision

    assert resolve_precision("fp32", "cpu") == "fp32"
    assert resolve_precision("auto", "cpu") == ("bf16" if cpu_supports_bf16() else "fp32")


@pytest.mark.parametrize(
    ("capability", "expected"), [((9, 0), "bf16"), ((8, 0), "bf16"), ((7, 5), "fp16"), ((7, 0), "fp16")]
)
def test_precision_auto_on_cuda_is_bf16_only_where_the_gpu_has_it(monkeypatch, capability, expected):
    """bf16 from compute capability 8.0 (Ampere) on; older GPUs (T4 7.5, V100 7.0) get fp16.
    torch.cuda.is_bf16_supported() counts emulated bf16 (slow) as support, so it said bf16
    on those too; and it asks the current device, not the one configured."""
    import torch

    from filtering.models.clip import resolve_precision

    asked = []
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # emulation counts as support
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: asked.append(d) or capability)
    assert resolve_precision("auto", "cuda:1") == expected
    assert asked and str(asked[-1]) == "cuda:1"
    assert resolve_precision("fp32", "cuda:1") == "fp32"


def test_score_caches_are_keyed_by_the_precision_auto_resolves_to(monkeypatch):
    """A cache scored in bf16 on one machine is not reused as fp32 scores on another."""
    import filtering.models.clip as clip_mod
    from filtering.scorers.clip import model_spec

    class Cfg:
        arch, pretrained, precision, device = "ViT-B-32", "openai", "auto", "auto"

    monkeypatch.setattr(clip_mod, "_nvidia_gpu_visible", lambda: False)
    monkeypatch.setattr(clip_mod, "cpu_supports_bf16", lambda: True)
    on_bf16_cpu = model_spec(Cfg)
    monkeypatch.setattr(clip_mod, "cpu_supports_bf16", lambda: False)
    on_avx2_cpu = model_spec(Cfg)
    assert on_bf16_cpu["precision"] == "bf16" and on_avx2_cpu["precision"] == "fp32"
    monkeypatch.setattr(clip_mod, "_nvidia_gpu_visible", lambda: True)
    assert model_spec(Cfg)["precision"] == "auto/cuda"
    Cfg.device = "cpu"
    assert model_spec(Cfg)["precision"] == "fp32"
    Cfg.precision = "fp16"
    assert model_spec(Cfg)["precision"] == "fp16"
    assert clip_mod.precision_key("auto", "cpu") == clip_mod.resolve_precision("auto", "cpu")  # same rule as loading
