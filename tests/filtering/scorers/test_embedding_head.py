"""The embedding_head scorer against float64 references of the public heads' forward passes."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from safetensors.numpy import save_file

from filtering.errors import ConfigError
from filtering.pool import ShardPart
from filtering.registry import parse_scorers
from filtering.scorers.base import Batch, InputInfo
from filtering.scorers.embedding_head import build_head, fold, forward_numpy, load_state_dict
from tests.datacomp_pool import (
    AESTHETIC_SHAPES,
    NSFW_SHAPES,
    random_state_dict,
    reference_aesthetic,
    reference_nsfw,
    save_torch_state_dict,
)

DC = InputInfo("datacomp", {"l14_img": 768, "b32_img": 512})


def _emb(n=300, dim=768, seed=1):
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float16)  # DataComp stores float16


def _scorer(weights, preset, info=DC, **params):
    [s] = parse_scorers([{"embedding_head": {"name": "h", "preset": preset, "weights": str(weights), **params}}], info)
    return s


def _score(scorer, emb):
    scorer.ensure_setup()
    batch = Batch(ShardPart("u", "s", 0, len(emb)), 0, np.asarray(emb, np.float32))
    return scorer.score(batch)[scorer.column]


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_aesthetic_preset_from_torch_state_dict_matches_reference(tmp_path, backend):
    sd = random_state_dict(AESTHETIC_SHAPES)
    path = save_torch_state_dict(sd, tmp_path / "sac+logos+ava1-l14-linearMSE.pth")
    emb = _emb()
    got = _score(_scorer(path, "laion_aesthetic", embedding="l14_img", backend=backend), emb)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, reference_aesthetic(emb, sd), atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_nsfw_preset_matches_reference(tmp_path, backend):
    sd = random_state_dict(NSFW_SHAPES, norm=768)
    save_file(sd, str(tmp_path / "nsfw.safetensors"))
    emb = _emb(seed=2)
    got = _score(_scorer(tmp_path / "nsfw.safetensors", "nemo_nsfw", backend=backend), emb)
    np.testing.assert_allclose(got, reference_nsfw(emb, sd), atol=1e-5, rtol=0)
    assert ((got >= 0) & (got <= 1)).all()


def test_fold_is_the_same_function_as_layer_by_layer():
    sd = random_state_dict(AESTHETIC_SHAPES, seed=3)
    head = build_head(sd, "laion_aesthetic")
    folded = fold(head)
    assert [lay.weight.shape for lay in folded] == [(1, 768)]  # five Linear layers, no activation: one map
    x = _emb(seed=4).astype(np.float32)
    np.testing.assert_allclose(forward_numpy(head, x, folded), forward_numpy(head, x), atol=1e-5, rtol=0)
    mlp = build_head(random_state_dict({"a": (8, 16), "b": (1, 8)}), "mlp", output="sigmoid")
    assert [lay.activation for lay in fold(mlp)] == ["relu", "sigmoid"]  # an activation stops the folding


def test_mlp_layers_in_natural_key_order_and_options(tmp_path):
    sd = random_state_dict({"layers.2": (4, 8), "layers.10": (1, 4), "layers.0": (8, 6)}, seed=5)
    head = build_head(sd, "mlp", activation="gelu", output="sigmoid", normalize=False)
    assert [lay.weight.shape for lay in head.layers] == [(8, 6), (4, 8), (1, 4)]
    x = np.random.default_rng(0).standard_normal((20, 6))
    from scipy.special import erf

    ref = x
    for name, act in (("layers.0", "gelu"), ("layers.2", "gelu"), ("layers.10", "sigmoid")):
        ref = ref @ sd[f"{name}.weight"].astype(np.float64).T + sd[f"{name}.bias"]
        ref = 0.5 * ref * (1 + erf(ref / np.sqrt(2))) if act == "gelu" else 1 / (1 + np.exp(-ref))
    np.testing.assert_allclose(forward_numpy(head, x), ref[:, 0], atol=1e-5)


def test_wrong_state_dict_for_the_preset_names_the_keys(tmp_path):
    save_file(random_state_dict(NSFW_SHAPES, norm=768), str(tmp_path / "nsfw.safetensors"))
    with pytest.raises(ConfigError, match=r"not a laion_aesthetic state dict: missing \['layers.0.bias'"):
        _scorer(tmp_path / "nsfw.safetensors", "laion_aesthetic").check()


def test_input_size_mismatch_names_head_and_embedding(tmp_path):
    save_torch_state_dict(random_state_dict(AESTHETIC_SHAPES), tmp_path / "a.pth")
    s = _scorer(tmp_path / "a.pth", "laion_aesthetic", embedding="b32_img")
    with pytest.raises(ConfigError) as e:
        s.check()
    msg = str(e.value)
    assert "768-dimensional" in msg and "'b32_img' has 512" in msg and msg.startswith("scorers[0].embedding_head")
    with pytest.raises(ConfigError, match="takes 768-dimensional"):  # at run time too, for kinds not known ahead
        _score(_scorer(tmp_path / "a.pth", "laion_aesthetic", info=InputInfo("datacomp")), _emb(dim=512))


def test_config_errors():
    with pytest.raises(ConfigError, match="unknown scorer 'embeding_head'; did you mean embedding_head"):
        parse_scorers([{"embeding_head": {}}], DC)
    with pytest.raises(
        ConfigError, match=r"scorers\[0\].embedding_head.preset: unknown preset 'aesthetic'; valid presets"
    ):
        parse_scorers([{"embedding_head": {"name": "a", "preset": "aesthetic", "weights": "w"}}], DC)
    with pytest.raises(ConfigError, match=r"scorers\[0\].embedding_head.backnd: unknown key; did you mean backend"):
        parse_scorers([{"embedding_head": {"name": "a", "preset": "mlp", "weights": "w", "backnd": "numpy"}}], DC)
    two = [{"embedding_head": {"name": "a", "preset": "mlp", "weights": "w"}}] * 2
    with pytest.raises(ConfigError, match="column 'a_score' is already written"):
        parse_scorers(two, DC)
    with pytest.raises(ConfigError, match="fixes activation"):
        build_head(random_state_dict(AESTHETIC_SHAPES), "laion_aesthetic", activation="relu")


def test_webdataset_input_offers_the_runs_clip_embeddings(tmp_path):
    save_file(random_state_dict({"layers.0": (1, 64)}), str(tmp_path / "w.safetensors"))
    s = _scorer(
        tmp_path / "w.safetensors",
        "linear",
        info=InputInfo("webdataset", {"image": 64, "text": 64}),
        embedding="l14_img",
    )
    with pytest.raises(ConfigError, match="WebDataset input has the run's CLIP embeddings 'image' and 'text'"):
        s.check()


def test_scorer_pickles_without_its_loaded_head(tmp_path):
    sd = random_state_dict({"layers.0": (1, 768)})
    save_file(sd, str(tmp_path / "w.safetensors"))
    s = _scorer(tmp_path / "w.safetensors", "linear")
    emb = _emb(n=10)
    before = _score(s, emb)
    clone = pickle.loads(pickle.dumps(s))
    assert not any(k.startswith("_model") for k in vars(clone)) and clone._ready is False
    np.testing.assert_array_equal(_score(clone, emb), before)


def test_unreadable_weights_are_input_errors(tmp_path):
    from filtering.errors import InputError

    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="not a weights-only torch state dict"):
        load_state_dict(str(tmp_path / "bad.pth"))
    with pytest.raises(InputError, match="not found"):
        load_state_dict(str(tmp_path / "missing.safetensors"))
