"""Image references to faithful RGB pictures, and how many pictures the processor makes of one image."""

from __future__ import annotations

import io
from typing import Any

from PIL import Image, ImageOps

# With do_image_splitting the Idefics2 image processor makes 4 crops and the whole image of each.
PICTURES_WITH_SPLITTING = 5


def pictures_per_image(do_image_splitting: bool) -> int:
    """The pictures the image processor makes of one image: 5 with splitting (4 crops and the whole), else 1."""
    return PICTURES_WITH_SPLITTING if do_image_splitting else 1


def load_image(ref: Any) -> Image.Image:
    """Open an image reference: a PIL image, a path, bytes, or a ``datasets`` image dict.

    A photo's EXIF orientation is applied (a phone photo of a page is stored sideways, with a tag
    saying how to turn it), so the model sees it as the camera's owner did.
    """
    if isinstance(ref, Image.Image):
        return ref
    if isinstance(ref, dict):
        if ref.get("bytes"):
            ref = ref["bytes"]
        elif ref.get("path"):
            ref = ref["path"]
        else:
            raise ValueError("image dict holds neither bytes nor a path")
    if isinstance(ref, (bytes, bytearray)):
        ref = io.BytesIO(ref)
    image = Image.open(ref)
    image.load()
    return to_rgb(ImageOps.exif_transpose(image))


def to_rgb(image: Image.Image) -> Image.Image:
    """A faithful 8-bit RGB image from any mode Pillow opens.

    ``convert("RGB")`` clips 16- and 32-bit grayscale (``I;16``, ``I``) to 0..255, which turns a
    16-bit scan almost white, and drops transparency onto whatever colour hides under it. Here
    integer images are scaled from their bit depth, float images from [0, 1], and transparent
    pixels are laid on white (the paper a document is printed on).
    """
    import numpy as np

    mode = image.mode
    if mode.startswith("I;16") or mode == "I":
        values = np.asarray(image, dtype=np.float64)
        peak = values.max(initial=0)
        # I;16 is 16-bit; "I" holds 32-bit integers: scaled from the smallest depth that fits them
        # (8-bit values stored as "I" stay as they are)
        top = (
            65535.0 if mode.startswith("I;16") else 255.0 if peak <= 255 else 65535.0 if peak <= 65535 else 2.0**31 - 1
        )
        return Image.fromarray(np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "LAB":  # Pillow's convert("RGB") misreads LAB; a colour transform does it right
        from PIL import ImageCms

        lab, srgb = ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB")
        return ImageCms.applyTransform(image, ImageCms.buildTransform(lab, srgb, "LAB", "RGB"))
    if mode in ("La", "RGBa"):  # premultiplied alpha: un-premultiply first
        image, mode = image.convert("LA" if mode == "La" else "RGBA"), "LA" if mode == "La" else "RGBA"
    if mode == "F":
        values = np.asarray(image, dtype=np.float64)
        scale = 255.0 if values.max(initial=0) <= 1.0 else 1.0
        return Image.fromarray(np.clip(values * scale + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image if mode == "RGB" else image.convert("RGB")
