"""Decode workers run the model's PIL preprocessing in plain PIL, pixel for pixel as torchvision does."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from filtering.models.transforms import PilTransform, draft_target, pil_only


def _images(rng):
    from PIL import Image

    sizes = [
        (224, 224),
        (225, 224),
        (640, 480),
        (480, 640),
        (300, 1000),
        (1000, 37),
        (13, 9),
        (1, 1),
        (223, 500),
        (97, 96),
    ]
    for w, h in sizes:
        rgb = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        yield rgb
        yield rgb.convert("L")
        yield rgb.convert("RGBA")
        yield rgb.convert("P")
        yield rgb.convert("CMYK")


def _transforms():
    from open_clip.transform import MaybeConvertMode
    from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Resize

    bicubic = InterpolationMode.BICUBIC
    return [
        Compose([Resize(224, interpolation=bicubic), CenterCrop(224), MaybeConvertMode()]),  # open_clip's default
        Compose([Resize(64, interpolation=bicubic), CenterCrop((64, 64)), MaybeConvertMode()]),  # the tiny model
        Compose([Resize((224, 224), interpolation=bicubic), MaybeConvertMode()]),  # resize_mode: squash
        Compose(
            [
                Resize(100, interpolation=InterpolationMode.BILINEAR, max_size=150),
                CenterCrop((120, 90)),
                MaybeConvertMode(),
            ]
        ),
    ]


@pytest.mark.parametrize("index", range(4))
def test_pil_transform_gives_torchvisions_pixels(index):
    reference = _transforms()[index]
    ours = pil_only(reference)
    assert isinstance(ours, PilTransform)
    assert draft_target(ours) == draft_target(reference)
    for img in _images(np.random.default_rng(index)):
        expected = np.asarray(reference(img))
        got = np.asarray(ours(img))
        assert got.shape == expected.shape and got.dtype == expected.dtype, (img.mode, img.size)
        np.testing.assert_array_equal(got, expected, err_msg=f"{img.mode} {img.size}")


def test_unknown_steps_keep_the_torchvision_transform():
    from torchvision.transforms import Compose, Grayscale, Resize

    transform = Compose([Resize(32), Grayscale(3)])
    assert pil_only(transform) is transform


def test_loaded_models_hand_workers_a_transform_that_needs_no_torch(tmp_path):
    """The PIL part of a loaded model's preprocessing unpickles in a process without torch."""
    import pickle

    from filtering.models.clip import load_clip

    clip = load_clip("ViT-B-32", None, "cpu", "fp32")
    assert isinstance(clip.pil_transform, PilTransform)
    (tmp_path / "t.pkl").write_bytes(pickle.dumps(clip.pil_transform))
    code = (
        "import pickle, sys; from PIL import Image; "
        f"t = pickle.load(open({str(tmp_path / 't.pkl')!r}, 'rb')); "
        "print(t(Image.new('RGB', (640, 480))).size, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["(224,", "224)", "False"]
