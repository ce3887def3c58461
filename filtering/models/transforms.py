"""open_clip's eval image transforms in plain PIL (:class:`PilTransform`), so the decode
workers that run them need no torch: the same calls with the same arithmetic, so the
same pixels. The model splits its preprocessing here (:func:`filtering.models.clip.split_transform`);
the decode plan (:mod:`filtering.stages.image_decode`) runs the PIL part."""

from __future__ import annotations


class PilTransform:
    """torchvision's ``Resize``, ``CenterCrop`` and open_clip's ``MaybeConvertMode`` on PIL
    images, in plain PIL: the same calls with the same arithmetic, so the same pixels.

    Decode workers start in a fresh process (spawn); unpickling a torchvision transform
    imports torch and torchvision there, which takes seconds per worker (about 8 s on a
    2-core VM) before the first image is decoded. This class needs only PIL.
    """

    def __init__(self, steps: list[tuple]):
        self.steps = steps

    def __call__(self, img):
        for op, *args in self.steps:
            if op == "resize":
                img = _resize(img, *args)
            elif op == "center_crop":
                img = _center_crop(img, *args)
            else:
                img = img.convert(args[0])
        return img

    def __repr__(self) -> str:
        return f"PilTransform({self.steps})"


def pil_only(transform):
    """``transform`` as a :class:`PilTransform` when every step is one it knows (open_clip's
    standard eval transforms), else ``transform`` itself."""
    steps = []
    for step in getattr(transform, "transforms", [transform]):
        name = type(step).__name__
        if name == "Resize":
            from torchvision.transforms.functional import pil_modes_mapping

            size = [step.size] if isinstance(step.size, int) else list(step.size)
            steps.append(("resize", size, step.max_size, pil_modes_mapping[step.interpolation]))
        elif name == "CenterCrop":
            steps.append(("center_crop", tuple(step.size)))
        elif name == "MaybeConvertMode":
            steps.append(("convert", step.mode))
        elif getattr(step, "__name__", "") == "_convert_to_rgb":  # open_clip before MaybeConvertMode
            steps.append(("convert", "RGB"))
        else:
            return transform
    return PilTransform(steps)


def _resize(img, size: list[int], max_size: int | None, resample: int):
    """torchvision ``F.resize`` on a PIL image (``_compute_resized_output_size``)."""
    w, h = img.size
    if len(size) == 1:
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = size[0], int(size[0] * long / short)
        if max_size is not None and new_long > max_size:
            new_short, new_long = int(max_size * new_short / new_long), max_size
        new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    else:
        new_h, new_w = size
    if (new_h, new_w) == (h, w):
        return img
    return img.resize((new_w, new_h), resample)


def _center_crop(img, size: tuple[int, int]):
    """torchvision ``F.center_crop`` on a PIL image, zero padding included."""
    from PIL import ImageOps

    crop_h, crop_w = size
    w, h = img.size
    if crop_w > w or crop_h > h:
        left, top = (crop_w - w) // 2 if crop_w > w else 0, (crop_h - h) // 2 if crop_h > h else 0
        right, bottom = (crop_w - w + 1) // 2 if crop_w > w else 0, (crop_h - h + 1) // 2 if crop_h > h else 0
        img = ImageOps.expand(img, border=(left, top, right, bottom), fill=0)
        w, h = img.size
        if (crop_w, crop_h) == (w, h):
            return img
    top = int(round((h - crop_h) / 2.0))
    left = int(round((w - crop_w) / 2.0))
    return img.crop((left, top, left + crop_w, top + crop_h))


def draft_target(transform) -> int | None:
    """The shorter-side size the transform resizes to (its first ``Resize`` step), or None."""
    if isinstance(transform, PilTransform):
        sizes = [args[0] for op, *args in transform.steps if op == "resize"]
        return max(sizes[0]) if sizes else None
    for step in getattr(transform, "transforms", [transform]):
        if type(step).__name__ == "Resize":
            size = step.size
            if isinstance(size, int):
                return size
            if isinstance(size, list | tuple) and size:
                return max(int(s) for s in size)
    return None
