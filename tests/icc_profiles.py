"""ICC profiles of the wide-gamut spaces cameras and phones write (Adobe RGB, Display P3), built from their published
primaries and tone curves, and a reference conversion to sRGB computed from the same definitions with numpy.

A matrix/TRC display profile is: tone curves taking encoded values to linear light, and the XYZ (D50, Bradford
adapted) of each primary. The reference applies those definitions directly, independently of LittleCMS.
"""

import struct

import numpy as np

D65 = (0.3127, 0.3290)
D50_XYZ = np.array([0.9642, 1.0, 0.8249])
BRADFORD = np.array([[0.8951, 0.2664, -0.1614], [-0.7502, 1.7135, 0.0367], [0.0389, -0.0685, 1.0296]])
PRIMARIES = {  # red, green, blue chromaticities (x, y); all three spaces have a D65 white
    "srgb": [(0.64, 0.33), (0.30, 0.60), (0.15, 0.06)],
    "adobe": [(0.64, 0.33), (0.21, 0.71), (0.15, 0.06)],
    "p3": [(0.680, 0.320), (0.265, 0.690), (0.150, 0.060)],
}
ADOBE_GAMMA = 563 / 256  # Adobe RGB (1998): 2.19921875, stored as u8Fixed8
SRGB_CURVE = (2.4, 1 / 1.055, 0.055 / 1.055, 1 / 12.92, 0.04045)  # Display P3 uses the sRGB curve


def xyz(x: float, y: float) -> np.ndarray:
    return np.array([x / y, 1.0, (1 - x - y) / y])


def rgb_to_xyz_d50(space: str) -> np.ndarray:
    """3x3 matrix from linear RGB to XYZ relative to D50 (the ICC connection space), Bradford adapted from D65."""
    columns = np.stack([xyz(*primary) for primary in PRIMARIES[space]], axis=1)
    white = xyz(*D65)
    matrix = columns * np.linalg.solve(columns, white)  # scale the primaries so that RGB = 1 gives the white
    cone_ratio = np.diag((BRADFORD @ D50_XYZ) / (BRADFORD @ white))
    return np.linalg.inv(BRADFORD) @ cone_ratio @ BRADFORD @ matrix


def decode_curve(encoded: np.ndarray, space: str) -> np.ndarray:
    if space == "adobe":
        return encoded**ADOBE_GAMMA
    g, a, b, c, d = SRGB_CURVE
    return np.where(encoded >= d, (a * encoded + b) ** g, c * encoded)


def reference_to_srgb(pixels: np.ndarray, space: str) -> np.ndarray:
    """Encoded RGB pixels (uint8) of `space` -> sRGB as floats in [0, 255] (out-of-gamut colours clipped)."""
    linear = decode_curve(pixels.astype(np.float64) / 255, space)
    convert = np.linalg.inv(rgb_to_xyz_d50("srgb")) @ rgb_to_xyz_d50(space)
    srgb = np.clip(linear @ convert.T, 0.0, 1.0)
    encoded = np.where(srgb <= 0.0031308, 12.92 * srgb, 1.055 * srgb ** (1 / 2.4) - 0.055)
    return encoded * 255


def s15(value: float) -> bytes:
    return struct.pack(">i", round(value * 65536))


def tag_xyz(values) -> bytes:
    return b"XYZ \0\0\0\0" + b"".join(s15(v) for v in values)


def tag_curve(space: str, table_size: int) -> bytes:
    """Adobe RGB: a gamma (or, with table_size, a sampled table); P3: the sRGB parametric curve."""
    if space == "p3":
        return b"para\0\0\0\0" + struct.pack(">HH", 3, 0) + b"".join(s15(v) for v in SRGB_CURVE)
    if not table_size:
        return b"curv\0\0\0\0" + struct.pack(">IH", 1, round(ADOBE_GAMMA * 256)) + b"\0\0"
    table = np.round(65535 * np.linspace(0, 1, table_size) ** ADOBE_GAMMA).astype(">u2")
    return b"curv\0\0\0\0" + struct.pack(">I", table_size) + table.tobytes()


def tag_text(kind: bytes, text: str) -> bytes:
    if kind == b"desc":  # ICC v2 textDescriptionType: ASCII, then empty Unicode and ScriptCode parts
        ascii_text = text.encode() + b"\0"
        return b"desc\0\0\0\0" + struct.pack(">I", len(ascii_text)) + ascii_text + bytes(4 + 4 + 2 + 1 + 67)
    return b"text\0\0\0\0" + text.encode() + b"\0"


def icc_profile(space: str, table_size: int = 0) -> bytes:
    """A v2.1 RGB display profile for `space` ("adobe" or "p3"). table_size > 0 (Adobe RGB only) stores the tone
    curves as sampled tables of that many entries: at 16384 the profile is about 100 kB, more than one JPEG APP2
    segment holds, so a JPEG splits it over several."""
    matrix = rgb_to_xyz_d50(space)
    names = {"adobe": "Adobe RGB (1998) compatible", "p3": "Display P3 compatible"}
    tags = [
        (b"desc", tag_text(b"desc", names[space])),
        (b"cprt", tag_text(b"text", "No copyright, test profile")),
        (b"wtpt", tag_xyz(D50_XYZ)),
        (b"rXYZ", tag_xyz(matrix[:, 0])),
        (b"gXYZ", tag_xyz(matrix[:, 1])),
        (b"bXYZ", tag_xyz(matrix[:, 2])),
    ]
    tags += [(name, tag_curve(space, table_size)) for name in (b"rTRC", b"gTRC", b"bTRC")]
    return assemble(b"RGB ", tags)


def gray_profile() -> bytes:
    """A v2.1 GRAY display profile with a gamma 2.2 tone curve (what some scanners and editors embed)."""
    tags = [
        (b"desc", tag_text(b"desc", "Gray Gamma 2.2 compatible")),
        (b"cprt", tag_text(b"text", "No copyright, test profile")),
        (b"wtpt", tag_xyz(D50_XYZ)),
        (b"kTRC", b"curv\0\0\0\0" + struct.pack(">IH", 1, round(2.2 * 256)) + b"\0\0"),
    ]
    return assemble(b"GRAY", tags)


def assemble(colour_space: bytes, tags: list[tuple[bytes, bytes]]) -> bytes:
    """An ICC v2.1 display profile: header, tag table, tag data."""
    offset, table, data = 128 + 4 + 12 * len(tags), b"", b""
    for name, body in tags:
        body += b"\0" * (-len(body) % 4)
        table += name + struct.pack(">II", offset + len(data), len(body))
        data += body
    size = offset + len(data)
    header = (
        struct.pack(">I", size)
        + b"\0" * 4
        + bytes([2, 0x10, 0, 0])
        + b"mntr"
        + colour_space
        + b"XYZ "
        + bytes(12)
        + b"acsp"
        + bytes(4 + 4 + 4 + 4 + 8 + 4)
        + b"".join(s15(v) for v in D50_XYZ)
        + bytes(4 + 16 + 28)
    )
    assert len(header) == 128
    return header + struct.pack(">I", len(tags)) + table + data
