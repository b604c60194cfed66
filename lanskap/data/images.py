"""Decoding an image file into the 8-bit sRGB pixels every later stage uses, and judging whether it can be trained on.

What a standard viewer shows is what training gets: the EXIF orientation applied, an embedded ICC colour profile
converted to sRGB (Adobe RGB or Display P3 photos otherwise come out dull or shifted), transparency composited on
white. Files are never modified: ingest stores byte-identical copies and every reader decodes them here.

The rules where a file is ambiguous, chosen as browsers and viewers resolve them:
- a profile for another colour space than the pixels' (GRAY on RGB pixels) is ignored, as browsers do, with a note;
- float pixels are scaled by their declared range: the TIFF SMinSampleValue/SMaxSampleValue tags when present,
  else [0, 1], the convention of float formats; whole numbers within [0, 255] are 8-bit values stored as floats and
  kept as they are. Values beyond the range are refused with the range found, never clipped;
- integer pixels deeper than 8 bits are scaled by 65535 (16 bits), unless their maximum fits 8 bits: then they are
  8-bit values in a deeper container (a true 16-bit picture that dark would be black) and kept as they are.
  Values beyond 16 bits are refused with the range found.
"""

import io
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageCms, ImageOps, TiffImagePlugin, UnidentifiedImageError

MAX_PIXELS = 64_000_000  # above this an image is treated as a decompression bomb
BLANK_TOLERANCE = 2  # levels: an image whose every channel spans no more than this is blank (all black, white, grey)
SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
# ICC colour spaces and the Pillow modes their pixels must be in for the conversion to sRGB.
PROFILE_MODES = {"RGB": "RGB", "GRAY": "L", "CMYK": "CMYK"}
# Formats people keep photos in that this install's Pillow cannot decode: named in the reason instead of "not an image".
UNDECODABLE = {"heic": "HEIC/HEIF", "jxl": "JPEG XL", "raw": "camera raw", "svg": "SVG (a vector drawing)"}
UNDECODABLE_SUFFIXES = {
    ".heic": "heic",
    ".heif": "heic",
    ".hif": "heic",
    ".jxl": "jxl",
    ".svg": "svg",
    **dict.fromkeys([".dng", ".cr2", ".cr3", ".nef", ".arw", ".orf", ".rw2", ".raf"], "raw"),
}
# ISO base media files (AVIF, HEIC) say what they hold in their `ftyp` box: bytes 4-8 are "ftyp", 8-12 the brand.
FTYP_BRANDS = {
    b"avif": "avif",
    b"avis": "avif",
    b"heic": "heic",
    b"heix": "heic",
    b"heim": "heic",
    b"heis": "heic",
    b"mif1": "heic",
    b"msf1": "heic",
}
MAGIC_BYTES = {  # WebP (RIFF....WEBP) and the ftyp formats are matched separately; TIFF in both byte orders
    b"\xff\xd8\xff": "jpeg",
    b"\x89PNG\r\n\x1a\n": "png",
    b"GIF87a": "gif",
    b"GIF89a": "gif",
    b"BM": "bmp",
    b"II*\x00": "tiff",
    b"MM\x00*": "tiff",
    b"\x00\x00\x01\x00": "ico",
    b"\xff\x0a": "jxl",
    b"\x00\x00\x00\x0cJXL \r\n\x87\n": "jxl",
    **{f"P{kind}".encode(): "pnm" for kind in "123456"},
}


class ItemRejected(Exception):
    """One offered item cannot be used; the message is the reason written to the rejected report."""


class Decoded(NamedTuple):
    image: Image.Image  # 8-bit sRGB
    format: str  # Pillow's name of the file format: it tells which extension the bytes deserve
    note: str = ""  # what was read differently from the file's own word (a mismatched profile ignored), for the report


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
    return decode(data_or_path).image


def decode(data_or_path) -> Decoded:
    source = io.BytesIO(data_or_path) if isinstance(data_or_path, bytes) else data_or_path
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(source) as image:
            if image.width * image.height > MAX_PIXELS:
                raise Image.DecompressionBombError(f"{image.width}x{image.height} pixels")
            image.seek(0)  # first frame of an animated GIF
            file_format, profile = image.format, image.info.get("icc_profile")
            declared = float_range(image)
            image = colour_channels(ImageOps.exif_transpose(image), declared)
            converted, note = to_srgb(image, profile)
            return Decoded(converted, file_format, note)


def float_range(image: Image.Image) -> tuple[float, float] | None:
    """The (black, white) values a float TIFF declares in its SMinSampleValue/SMaxSampleValue tags, or None."""
    tags = getattr(image, "tag_v2", {})
    if image.mode != "F" or 341 not in tags:
        return None
    low, high = (tags.get(tag, (default,)) for tag, default in ((340, 0.0), (341, 1.0)))
    low, high = (float(value[0] if isinstance(value, tuple) else value) for value in (low, high))
    return (low, high) if high > low else None


def colour_channels(image: Image.Image, declared: tuple[float, float] | None = None) -> Image.Image:
    """The image as 8-bit L, RGB or CMYK: deep and float pixels scaled, transparency composited on white."""
    if image.mode == "F":
        return Image.fromarray(scaled_floats(np.asarray(image, dtype=np.float64), declared), "L")
    if image.mode.startswith("I"):  # 16-bit (I;16*) or 32-bit integer
        return Image.fromarray(scaled_integers(np.asarray(image, dtype=np.float64)), "L")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    return image if image.mode in ("L", "RGB", "CMYK") else image.convert("RGB")


def scaled_floats(pixels: np.ndarray, declared: tuple[float, float] | None) -> np.ndarray:
    """Float pixels to 8 bits by their declared range (module docstring); NaN is black."""
    pixels = np.nan_to_num(pixels, nan=0.0, posinf=np.inf, neginf=-np.inf)
    found = f"{pixels.min():.4g}..{pixels.max():.4g}"
    if declared is None and pixels.min() >= 0 and 1 < pixels.max() <= 255 and np.all(pixels == np.round(pixels)):
        declared = (0.0, 255.0)  # an 8-bit picture saved as floats
    low, high = declared or (0.0, 1.0)
    if pixels.min() < low or pixels.max() > high:
        source = "its SMinSampleValue/SMaxSampleValue tags" if declared else "float images (no range declared)"
        raise ItemRejected(
            f"float pixels span {found}, beyond the range {low:g}..{high:g} of {source}: they cannot "
            "be shown without guessing an exposure; export it as an 8- or 16-bit image"
        )
    return np.round((pixels - low) * (255 / (high - low))).astype(np.uint8)


def scaled_integers(pixels: np.ndarray) -> np.ndarray:
    """Integer pixels to 8 bits: kept when they fit 8 bits, else scaled by 65535 (module docstring)."""
    if pixels.min() < 0 or pixels.max() > 65535:
        raise ItemRejected(
            f"integer pixels span {pixels.min():.0f}..{pixels.max():.0f}, beyond the 16-bit range "
            "0..65535 this reads; export it as an 8- or 16-bit image"
        )
    if pixels.max() <= 255:
        return pixels.astype(np.uint8)
    return np.round(pixels * (255 / 65535)).astype(np.uint8)


def to_srgb(image: Image.Image, icc_profile: bytes | None) -> tuple[Image.Image, str]:
    """Convert pixels described by an embedded ICC profile to sRGB (perceptual intent, as viewers do); pixels
    without a profile are taken to be sRGB already, and so are pixels whose profile is for another colour space
    (a note says so)."""
    if not icc_profile:
        return image.convert("RGB"), ""
    try:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc_profile))
    except (OSError, ImageCms.PyCMSError) as error:
        raise ItemRejected(f"unreadable ICC colour profile ({error}); re-save the image in sRGB") from None
    space = profile.profile.xcolor_space.strip()
    pixels = {"L": "GRAY", "CMYK": "CMYK"}.get(image.mode, "RGB")
    if space != pixels:
        return image.convert("RGB"), f"ICC colour profile for {space} ignored: the pixels are {pixels}"
    try:
        return ImageCms.profileToProfile(image.convert(PROFILE_MODES[space]), profile, SRGB, outputMode="RGB"), ""
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
    if kind == "tiff" and tiff_layout(data):
        return (
            f"TIFF of {tiff_layout(data)}, which this install cannot decode (Pillow has no reader for that "
            "layout: float TIFFs only with one channel); export it as an 8- or 16-bit TIFF or PNG"
        )
    if kind in UNDECODABLE:
        return (
            f"{UNDECODABLE[kind]} image, which this install cannot decode (Pillow has no reader for it); "
            "convert it to JPEG or PNG"
        )
    return "not an image (content not recognised by Pillow)"


def tiff_layout(data: bytes) -> str:
    """ "3 channel(s) of 32-bit float" from a TIFF's first directory; "" when it cannot be read."""
    try:
        directory = TiffImagePlugin.ImageFileDirectory_v2(data[:8])
        stream = io.BytesIO(data)
        stream.seek(directory.next)  # the header's offset of the first directory
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a damaged directory: warned of, then read as far as it goes
            directory.load(stream)
        bits, kind = directory.get(258, (1,)), directory.get(339, (1,))
    except (OSError, ValueError, SyntaxError, TypeError):
        return ""
    if 256 not in directory:  # no width: not a directory at all
        return ""
    kinds = {1: "unsigned integer", 2: "signed integer", 3: "float"}
    return f"{directory.get(277, 1)} channel(s) of {bits[0]}-bit {kinds.get(kind[0], 'undefined')}"


def check_image(data: bytes, name: str, min_size: int, max_aspect_ratio: float) -> Decoded:
    """The decoded image for a usable image; ItemRejected with the reason otherwise."""
    try:
        image, file_format, note = decode(data)
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
            f"{100 * min(width, height) / max(width, height):.1f}% of it; crop it yourself, or raise the limit"
        )
    colour = blank_colour(image)
    if colour is not None:
        raise ItemRejected(
            f"blank image: every pixel is {colour} (within {BLANK_TOLERANCE} levels); a failed export "
            "or a frame with nothing on it"
        )
    return Decoded(image, file_format, note)
