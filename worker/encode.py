"""Encode generated images, with the generation parameters embedded where the format allows."""

from __future__ import annotations

import hashlib
import io
import json

from PIL import Image, PngImagePlugin

from latentd.contract import CONTENT_TYPES, ImageMeta, JobPayload
from worker.pipeline import SCHEDULER_RAN, WITHHELD

EXIF_IFD, USER_COMMENT, IMAGE_DESCRIPTION = 0x8769, 0x9286, 0x010E


def sampler(payload: JobPayload, ran: str | None) -> str:
    """The scheduler asked for, or the model's own, named by its class: "default" alone did not
    say which scheduler made the picture."""
    return payload.scheduler or (f"default ({ran})" if ran else "default")


def parameters_text(payload: JobPayload, index: int, ran: str | None = None) -> str:
    """The parameters in the widely read `parameters` convention (prompt first, then key: value)."""
    lines = [payload.prompt]
    if payload.negative_prompt:
        lines.append(f"Negative prompt: {payload.negative_prompt}")
    lines.append(
        f"Steps: {payload.steps}, Sampler: {sampler(payload, ran)}, "
        f"CFG scale: {payload.guidance_scale:g}, Seed: {payload.image_seed(index)}, "
        f"Size: {payload.width}x{payload.height}, Model: {payload.model}"
    )
    return "\n".join(lines)


def metadata(payload: JobPayload, index: int, ran: str | None = None) -> dict[str, object]:
    # Nothing job-specific (no id): the same request and seed give byte-identical files.
    return {
        "prompt": payload.prompt,
        "negative_prompt": payload.negative_prompt,
        "seed": payload.image_seed(index),
        "steps": payload.steps,
        "guidance_scale": payload.guidance_scale,
        "scheduler": sampler(payload, ran),
        "model": payload.model,
        "width": payload.width,
        "height": payload.height,
    }


def encode(image: Image.Image, payload: JobPayload, index: int) -> tuple[bytes, ImageMeta]:
    ran = image.info.get(SCHEDULER_RAN)
    buf = io.BytesIO()
    fmt = payload.output_format
    if fmt == "png":
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", parameters_text(payload, index, ran))
        info.add_itxt("latentd", json.dumps(metadata(payload, index, ran)))
        image.save(buf, format="PNG", pnginfo=info)
    elif fmt == "jpeg":
        image.convert("RGB").save(
            buf, format="JPEG", quality=92, comment=parameters_text(payload, index, ran).encode()
        )
    else:
        text = parameters_text(payload, index, ran)
        exif = Image.Exif()
        # UserComment, as UTF-16 under the UNICODE charset (where other tools put `parameters`);
        # ImageDescription only when the text is ASCII: that field holds nothing else ("café" was
        # written "caf?").
        exif.get_ifd(EXIF_IFD)[USER_COMMENT] = b"UNICODE\0" + text.encode("utf-16-be")
        if text.isascii():
            exif[IMAGE_DESCRIPTION] = text
        image.save(buf, format="WEBP", quality=90, exif=exif)
    data = buf.getvalue()
    meta = ImageMeta(
        index=index,
        seed=payload.image_seed(index),
        content_type=CONTENT_TYPES[fmt],
        bytes=len(data),
        etag='"' + hashlib.sha256(data).hexdigest()[:32] + '"',
        withheld=bool(image.info.get(WITHHELD)),
    )
    return data, meta
