"""Uploaded images (read within the limits on the event loop, decoded on the worker thread) and PNG output."""

import base64
import io
import math

from fastapi import HTTPException, UploadFile
from PIL import Image

from sdxs.server.settings import ServerSettings


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def png_data_uri(image: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode("ascii")


async def read_upload(file: UploadFile, settings: ServerSettings, max_side: int | None = None) -> Image.Image:
    """Read an uploaded image's bytes and header within the byte and pixel limits (413 / 422 with a clear
    message). The pixels are NOT decoded here (that would block the event loop and hold memory per waiting
    request): the job calls `decode_upload` on the worker thread."""
    data = await file.read(settings.max_upload_bytes + 1)
    if len(data) > settings.max_upload_bytes:
        raise HTTPException(413, f"upload is larger than the limit of {megabytes(settings.max_upload_bytes)}")
    if not data:
        raise HTTPException(422, "image: the uploaded file is empty")
    limit = f"at most {settings.max_upload_pixels} pixels"
    try:
        image = Image.open(io.BytesIO(data))  # reads the header only: the size is known before decoding
    except Image.DecompressionBombError as e:
        # Pillow refuses headers over 2x its own MAX_IMAGE_PIXELS before we see the size: too many pixels all the
        # same, so 413 like any other image over our (smaller) limit, not "unreadable"
        raise HTTPException(413, f"image has more pixels than this server accepts ({limit})") from e
    except MemoryError:
        raise
    except Exception as e:  # every undecodable upload is the client's problem, whatever Pillow raised
        raise HTTPException(422, unreadable(e)) from e
    if image.width * image.height > settings.max_upload_pixels:
        raise HTTPException(
            413, f"image is {image.width}x{image.height}: more pixels than this server accepts ({limit})"
        )
    if max_side is not None and max(image.size) > max_side:
        raise HTTPException(
            422, f"image is {image.width}x{image.height}; this endpoint takes at most {max_side} pixels per side"
        )
    return image


def unreadable(error: Exception) -> str:
    """The 422 message for an upload Pillow could not read: its own reason, one short line."""
    reason = " ".join(str(error).split())[:120] or type(error).__name__
    return f"image: not a readable image file ({reason})"


def decode_upload(image: Image.Image) -> Image.Image:
    """Decode an image opened by `read_upload` to 8-bit RGB (on the worker thread); a broken file is a ValueError,
    which the server answers with 422.

    Pillow's decoders raise more than OSError on hostile files: a PNG chunk with an invalid type is a
    `SyntaxError`, others give `struct.error`, `IndexError`, `EOFError`, `zlib.error`... Any of them here means the
    upload cannot be decoded (a 500 with a traceback before, for SyntaxError), so all become the same 422. The
    conversion to RGB (EXIF orientation, transparency on white, as the pipeline does) runs here too, so nothing in
    the file can fail later, inside the model."""
    from sdxs.pipeline import load_rgb_image

    try:
        image.load()
        return load_rgb_image(image)
    except MemoryError:
        raise
    except Exception as e:
        raise ValueError(unreadable(e)) from e


def vision_pixel_budget(pipe) -> int | None:
    """Pixels an image prompt is encoded at: the smaller of the vision processor's own `longest_edge` and what
    `encode_image` asks of it (at most `text_recipe.max_length - 2` image tokens of `(patch_size * merge_size)**2`
    pixels each). None when the pipeline has no vision processor to say."""
    vp = getattr(pipe, "vision_processor", None)
    size = getattr(vp, "size", None) or {}
    budgets = [size["longest_edge"]] if isinstance(size, dict) and size.get("longest_edge") else []
    recipe = getattr(getattr(pipe, "config", None), "text_recipe", None)
    if isinstance(getattr(vp, "patch_size", None), int) and isinstance(getattr(vp, "merge_size", None), int) and recipe:
        unit = vp.patch_size * vp.merge_size
        budgets.append(max(4, int(dict(recipe).get("max_length", 250)) - 2) * unit * unit)
    return min(budgets) if budgets else None


def shrink_for_vision(image: Image.Image, pipe) -> Image.Image:
    """Resize an image larger than the pixels it will be encoded at (`vision_pixel_budget`) down to them with PIL
    (uint8), instead of letting the processor do it on a float copy. `encode_image` resizes to within this budget
    anyway, so the embedding barely changes; the memory does: one 4096x4096 image prompt on the shipped model took
    the process's peak RSS up by 223 MB when shrunk only to the processor's default budget, by 60 MB now."""
    budget = vision_pixel_budget(pipe)
    if not budget or image.width * image.height <= budget:
        return image
    scale = math.sqrt(budget / (image.width * image.height))
    new = (max(1, int(image.width * scale)), max(1, int(image.height * scale)))
    from sdxs.pipeline import load_rgb_image  # transparency on white, EXIF, modes: as encode_image would

    rgb = image if image.mode == "RGB" else load_rgb_image(image)  # decode_upload's output is RGB already
    return rgb.resize(new, Image.Resampling.BICUBIC, reducing_gap=2.0)


def megabytes(n: int) -> str:
    return f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{n / 1024:.0f} KB"
