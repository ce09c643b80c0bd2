"""Pixel preprocessing: images as nested lists / arrays -> normalised ``[N, 3, S, S]`` tensors.

The project's own families preprocess without PIL; task-model folders (``image_task``) use their own
image processor when they ship one (:func:`processor_pixels`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _image_chw(im: Any) -> torch.Tensor:
    """One grey / RGB image (nested lists, flat square list, HxW, HxWx3 or 3xHxW) -> float [3, H, W] as given."""
    a = np.asarray(im, dtype=np.float32)
    if a.ndim == 1:
        s = int(round(np.sqrt(a.size)))
        if s * s != a.size:
            raise ValueError(f"flat image of {a.size} values is not square")
        a = a.reshape(s, s)
    if a.ndim == 2:
        a = np.repeat(a[None], 3, axis=0)
    elif a.ndim == 3 and a.shape[-1] in (1, 3) and a.shape[0] not in (1, 3):
        a = np.transpose(a, (2, 0, 1))
    if a.shape[0] == 1:
        a = np.repeat(a, 3, axis=0)
    return torch.from_numpy(np.ascontiguousarray(a))



def images_to_tensor(images: list[Any], size: int) -> torch.Tensor:
    """Grey or RGB images (nested lists, or flat square lists), values in [0, 1] or [0, 255] -> normalised [N,3,S,S]."""
    x = torch.stack([_image_chw(im) for im in images])
    if float(x.max()) > 1.5:
        x = x / 255.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std



def clip_images_to_tensor(images: list[Any], size: int, mean: Any = CLIP_MEAN, std: Any = CLIP_STD) -> torch.Tensor:
    """CLIP preprocessing without PIL: shortest side -> ``size`` (bicubic), centre crop, CLIP mean / std.

    Values in [0, 255] (any value > 1.5 in the batch) are scaled to [0, 1] first, as in ``images_to_tensor``.
    """
    ims = [_image_chw(im) for im in images]
    scale = 255.0 if max(float(x.max()) for x in ims) > 1.5 else 1.0
    out = []
    for x in ims:
        x = x / scale
        h, w = x.shape[-2:]
        if (h, w) != (size, size):
            r = size / min(h, w)
            nh, nw = max(size, int(round(h * r))), max(size, int(round(w * r)))
            x = F.interpolate(x[None], size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)[0]
            top, left = (nh - size) // 2, (nw - size) // 2
            x = x[:, top:top + size, left:left + size]
        out.append(x)
    x = torch.stack(out)
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    sd = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (x - m) / sd


DEFAULT_TASK_IMAGE_SIZE = 224
PROCESSOR_CHUNK = 256  # images per image-processor call (bounds the memory of the PIL path)


def _as_hwc_arrays(images: list[Any]) -> tuple[list[np.ndarray], bool]:
    """Images as ``H x W x 3`` arrays (uint8 when integer-valued) and whether they are in [0, 255].

    One rule for the whole split, as :func:`images_to_tensor`: any value > 1.5 means [0, 255], else [0, 1].
    """
    chw = [_image_chw(im).numpy() for im in images]
    is_255 = max(float(a.max()) for a in chw) > 1.5
    out = []
    for a in chw:
        a = np.ascontiguousarray(np.transpose(a, (1, 2, 0)))
        if is_255 and np.array_equal(a, np.round(a)) and a.min() >= 0 and a.max() <= 255:
            a = a.astype(np.uint8)
        out.append(a)
    return out, is_255


def processor_pixels(images: list[Any], folder: Path) -> np.ndarray:
    """``pixel_values`` [N, 3, H, W] for a task-model folder's images.

    With a ``preprocessor_config.json`` in ``folder``: that folder's own ``AutoImageProcessor`` (what plain
    ``transformers`` users run; images in [0, 1] are passed with ``do_rescale=False``, as they are already
    rescaled). Without one: bilinear resize to the config's ``image_size`` (else 224), ImageNet mean / std.
    """
    if not (folder / "preprocessor_config.json").is_file():
        import json

        cfg = json.loads((folder / "config.json").read_text())
        return images_to_tensor(images, int(cfg.get("image_size") or DEFAULT_TASK_IMAGE_SIZE)).numpy()
    from transformers import AutoImageProcessor
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "falling back to the PIL backend" is not the user's concern here
    try:
        proc = AutoImageProcessor.from_pretrained(str(folder))
    finally:
        hf_logging.set_verbosity(level)
    arrays, is_255 = _as_hwc_arrays(images)
    kw = {} if is_255 else {"do_rescale": False}
    parts = [np.asarray(proc(arrays[s:s + PROCESSOR_CHUNK], return_tensors="np", **kw)["pixel_values"], np.float32)
             for s in range(0, len(arrays), PROCESSOR_CHUNK)]
    return np.concatenate(parts)
