"""What a request carries, checked before it costs anything: the body under the upload limit (read in chunks, never
past it; gzip/deflate bodies inflated only up to it), and images identified from their header, refused over a pixel
limit before a single pixel is allocated (a 40000x40000 PNG of a few KB is a 400, not 4.8 GB of RAM).

Framework-free (no ray, no FastAPI): the ingress calls these; tests call them directly."""

from __future__ import annotations

import io
import zlib
from collections.abc import AsyncIterator

import numpy as np
from PIL import Image, UnidentifiedImageError

from noop_rt.runtime.errors import BadInputError
from noop_rt.runtime.images import decode_model_input

# Formats a server decodes. Never EPS/PS (Pillow runs Ghostscript for them) nor the exotic plugins.
FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF", "PPM")


class RequestError(BadInputError):
    """A request the server refuses: an HTTP status and a one-line reason (sent as {"error": reason})."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def too_large(limit: int) -> RequestError:
    return RequestError(413, f"request body over the upload limit of {limit / 1024 / 1024:g} MB (--max-upload-mb)")


def check_declared_length(content_length: str | None, limit: int | None) -> None:
    """413 from the Content-Length header alone, before any byte is read."""
    if content_length is None or limit is None:
        return
    try:
        declared = int(content_length)
    except ValueError:
        raise RequestError(400, f"bad Content-Length header: {content_length!r}") from None
    if declared > limit:
        raise too_large(limit)


async def read_body(chunks: AsyncIterator[bytes], limit: int | None) -> bytes:
    """The body, read chunk by chunk; 413 as soon as it passes `limit` (chunked uploads have no Content-Length)."""
    parts: list[bytes] = []
    size = 0
    async for chunk in chunks:
        size += len(chunk)
        if limit is not None and size > limit:
            raise too_large(limit)
        parts.append(chunk)
    return b"".join(parts)


def inflate(body: bytes, encoding: str | None, limit: int | None) -> bytes:
    """Undo a gzip/deflate Content-Encoding (tritonclient can send either), never past `limit` bytes."""
    coding = (encoding or "identity").strip().lower()
    if coding in ("", "identity"):
        return body
    if coding not in ("gzip", "deflate"):
        raise RequestError(415, f"unsupported Content-Encoding {encoding!r} (gzip, deflate or none)")
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS if coding == "gzip" else zlib.MAX_WBITS)
    cap = limit if limit is not None else 1 << 34
    try:
        out = inflater.decompress(body, cap + 1)
    except zlib.error as exc:
        raise RequestError(400, f"cannot inflate the {coding} body: {exc}") from None
    if len(out) > cap or inflater.unconsumed_tail:
        raise too_large(cap)
    if not inflater.eof:
        raise RequestError(400, f"the {coding} body is truncated")
    return out


def check_image_header(data: bytes, name: str, max_pixels: int) -> tuple[str, int, int]:
    """(format, width, height) from the header alone; 400 for an empty file or one over `max_pixels`, 415 for
    something that is not an image. Pillow's `Image.open` reads the header and allocates no pixels."""
    if not data:
        raise RequestError(400, f"{name} is empty")
    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as img:
            fmt, (width, height) = str(img.format), img.size
    except UnidentifiedImageError:
        raise RequestError(415, f"{name} is not an image this server decodes ({', '.join(FORMATS)})") from None
    except Image.DecompressionBombError as exc:
        raise RequestError(400, f"{name} refused as a decompression bomb: {str(exc).splitlines()[0]}") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise RequestError(400, f"{name} has a corrupt header: {str(exc).splitlines()[0] if str(exc) else exc!r}") \
            from None
    if width * height > max_pixels:
        raise RequestError(400, f"{name} refused: {width}x{height} pixels is over the server's limit of "
                                f"{max_pixels:,} pixels")
    return fmt, width, height


def check_request_pixels(uploads: list[tuple[str, bytes]], max_pixels: int, budget: int) -> None:
    """Every image's header against the per-image limit, and their sum against the request's budget, before a
    single pixel is decoded (many images at the limit each still make one request too large)."""
    total = 0
    for name, data in uploads:
        _, width, height = check_image_header(data, name, max_pixels)
        total += width * height
    if total > budget:
        raise RequestError(413, f"the request's {len(uploads)} image(s) hold {total:,} pixels in all; the limit "
                                f"per request is {budget:,}")


def decode_image(data: bytes, name: str, resolution: int, max_pixels: int) -> np.ndarray:
    """Encoded image bytes -> the model's input (3, R, R) float32 in [-1, 1], after the header check."""
    check_image_header(data, name, max_pixels)
    try:
        return decode_model_input(data, name, resolution)
    except BadInputError as exc:
        raise RequestError(400, str(exc)) from None


def check_float_images(images: np.ndarray, resolution: int, max_images: int) -> np.ndarray:
    """Preprocessed images (B, 3, R, R) float32: the classifier graph's own input, finite and in [-1, 1], at most
    `max_images` of them (the same cap as for encoded images)."""
    if images.ndim >= 1 and images.shape[0] > max_images:
        raise RequestError(400, f"{images.shape[0]} images in one request; the limit is {max_images}")
    if images.ndim != 4 or images.shape[1:] != (3, resolution, resolution) or images.shape[0] < 1:
        raise RequestError(400, f"input 'image' must have shape [B, 3, {resolution}, {resolution}] (B >= 1), got "
                                f"{list(images.shape)}")
    if not np.isfinite(images).all() or images.min() < -1.001 or images.max() > 1.001:
        raise RequestError(400, "input 'image' must hold finite values in [-1, 1] (the preprocessed image)")
    return np.ascontiguousarray(images, dtype=np.float32)
