"""Decoding an image file into the 8-bit sRGB pixels every later stage uses, and judging whether it can be trained on.

What a standard viewer shows is what training gets: the EXIF orientation applied, an embedded ICC colour profile
converted to sRGB (Adobe RGB or Display P3 photos otherwise come out dull or shifted), high bit depths scaled to 8
bits, floats in [0, 1] mapped to [0, 255], transparency composited on white. Files are never modified: ingest stores
byte-identical copies and every reader decodes them here.
"""

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

MAX_PIXELS = 64_000_000  # above this an image is treated as a decompression bomb
BLANK_TOLERANCE = 2  # levels: an image whose every channel spans no more than this is blank (all black, white, grey)
SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
# ICC colour spaces and the Pillow modes their pixels must be in for the conversion to sRGB.
PROFILE_MODES = {"RGB": "RGB", "GRAY": "L", "CMYK": "CMYK"}
# Formats people keep photos in that this install's Pillow cannot decode: named in the reason instead of "not an image".
UNDECODABLE = {"heic": "HEIC/HEIF", "jxl": "JPEG XL", "raw": "camera raw", "svg": "SVG (a vector drawing)"}
UNDECODABLE_SUFFIXES = {".heic": "heic", ".heif": "heic", ".hif": "heic", ".jxl": "jxl", ".svg": "svg",
                        **dict.fromkeys([".dng", ".cr2", ".cr3", ".nef", ".arw", ".orf", ".rw2", ".raf"], "raw")}
# ISO base media files (AVIF, HEIC) say what they hold in their `ftyp` box: bytes 4-8 are "ftyp", 8-12 the brand.
FTYP_BRANDS = {b"avif": "avif", b"avis": "avif", b"heic": "heic", b"heix": "heic", b"heim": "heic", b"heis": "heic",
               b"mif1": "heic", b"msf1": "heic"}
MAGIC_BYTES = {  # WebP (RIFF....WEBP) and the ftyp formats are matched separately; TIFF in both byte orders
    b"\xff\xd8\xff": "jpeg", b"\x89PNG\r\n\x1a\n": "png", b"GIF87a": "gif", b"GIF89a": "gif", b"BM": "bmp",
    b"II*\x00": "tiff", b"MM\x00*": "tiff", b"\x00\x00\x01\x00": "ico", b"\xff\x0a": "jxl",
    b"\x00\x00\x00\x0cJXL \r\n\x87\n": "jxl", **{f"P{kind}".encode(): "pnm" for kind in "123456"},
}


class ItemRejected(Exception):
    """One offered item cannot be used; the message is the reason written to the rejected report."""


def sniff_image_format(data: bytes) -> str | None:
    """The image format named by the content's first bytes, or None."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[4:8] == b"ftyp":
        return FTYP_BRANDS.get(data[8:12])
    if data[:2] in {b"P1", b"P2", b"P3", b"P4", b"P5", b"P6"} and data[2:3] not in b" \t\r\n":
        return None  # "P5" must be followed by whitespace: text files starting with "P1" are no images
    return next((name for magic, name in MAGIC_BYTES.items() if data.startswith(magic)), None)


def open_rgb(data_or_path) -> Image.Image:
    """Decode an image fully into 8-bit sRGB (see the module docstring); raises on a file that cannot be."""
    return decode(data_or_path)[0]


def decode(data_or_path) -> tuple[Image.Image, str]:
    """(RGB image, Pillow's name of the file format) - the format tells which extension the bytes deserve."""
    source = io.BytesIO(data_or_path) if isinstance(data_or_path, bytes) else data_or_path
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(source) as image:
            if image.width * image.height > MAX_PIXELS:
                raise Image.DecompressionBombError(f"{image.width}x{image.height} pixels")
            image.seek(0)  # first frame of an animated GIF
            file_format, profile = image.format, image.info.get("icc_profile")
            image = colour_channels(ImageOps.exif_transpose(image))
            return to_srgb(image, profile), file_format


def colour_channels(image: Image.Image) -> Image.Image:
    """The image as 8-bit L, RGB or CMYK: deep and float pixels scaled, transparency composited on white."""
    if image.mode == "F":  # float: [0, 1] is black to white, as in every float image format; outside is clipped
        pixels = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0)
        return Image.fromarray(np.round(np.clip(pixels, 0.0, 1.0) * 255).astype(np.uint8), "L")
    if image.mode.startswith("I"):  # 16-bit (I;16*) or 32-bit integer, both read as 16-bit: 65535 is white
        pixels = np.asarray(image, dtype=np.float64)
        return Image.fromarray(np.round(np.clip(pixels, 0, 65535) * (255 / 65535)).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    return image if image.mode in ("L", "RGB", "CMYK") else image.convert("RGB")


def to_srgb(image: Image.Image, icc_profile: bytes | None) -> Image.Image:
    """Convert pixels described by an embedded ICC profile to sRGB (perceptual intent, as viewers do); pixels
    without a profile are taken to be sRGB already."""
    if not icc_profile:
        return image.convert("RGB")
    try:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc_profile))
    except (OSError, ImageCms.PyCMSError) as error:
        raise ItemRejected(f"unreadable ICC colour profile ({error}); re-save the image in sRGB") from None
    space = profile.profile.xcolor_space.strip()
    mode = PROFILE_MODES.get(space)
    if mode is None or (image.mode == "CMYK") != (mode == "CMYK"):
        raise ItemRejected(f"its ICC colour profile is for {space} but the pixels are {image.mode}; re-save it in sRGB")
    try:
        return ImageCms.profileToProfile(image.convert(mode), profile, SRGB, outputMode="RGB")
    except ImageCms.PyCMSError as error:
        raise ItemRejected(f"ICC colour profile cannot be applied ({error}); re-save the image in sRGB") from None


def blank_colour(image: Image.Image) -> tuple[int, ...] | None:
    """The colour of an image that is one colour throughout (within BLANK_TOLERANCE levels), else None."""
    extrema = image.getextrema()
    if all(high - low <= BLANK_TOLERANCE for low, high in extrema):
        return tuple(low for low, _ in extrema)
    return None


def undecodable_reason(data: bytes, name: str) -> str:
    """Why Pillow did not recognise the content: a photo format it cannot read, or not an image at all."""
    kind = sniff_image_format(data) or UNDECODABLE_SUFFIXES.get(Path(name).suffix.lower())
    if kind in UNDECODABLE:
        return (f"{UNDECODABLE[kind]} image, which this install cannot decode (Pillow has no reader for it); "
                "convert it to JPEG or PNG")
    return "not an image (content not recognised by Pillow)"


def check_image(data: bytes, name: str, min_size: int, max_aspect_ratio: float) -> tuple[Image.Image, str]:
    """(RGB image, file format) for a usable image; ItemRejected with the reason otherwise."""
    try:
        image, file_format = decode(data)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ItemRejected(f"decompression bomb: {error}") from None
    except UnidentifiedImageError:
        raise ItemRejected(undecodable_reason(data, name)) from None
    except (OSError, ValueError, SyntaxError) as error:
        raise ItemRejected(f"corrupt or truncated image: {error}") from None
    width, height = image.size
    if min(width, height) < min_size:
        raise ItemRejected(f"too small: {width}x{height}, shorter side below ingest.min_size={min_size}")
    if max(width, height) / min(width, height) > max_aspect_ratio:
        raise ItemRejected(
            f"aspect ratio {max(width, height) / min(width, height):.1f}:1 ({width}x{height}) is beyond "
            f"ingest.max_aspect_ratio={max_aspect_ratio:g}: a square training crop would keep "
            f"{100 * min(width, height) / max(width, height):.1f}% of it; crop it yourself, or raise the limit")
    colour = blank_colour(image)
    if colour is not None:
        raise ItemRejected(f"blank image: every pixel is {colour} (within {BLANK_TOLERANCE} levels); a failed export "
                           "or a frame with nothing on it")
    return image, file_format
