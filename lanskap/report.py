"""Figures for people: labelled image grids (preview, comparisons) small enough to keep in git."""

from PIL import Image, ImageDraw

LABEL_HEIGHT = 14


def image_grid(rows: list[list[Image.Image]], column_labels: list[str], cell: int = 128) -> Image.Image:
    """Rows of images resized to `cell` px squares under a header of column labels."""
    columns = len(column_labels)
    grid = Image.new("RGB", (columns * cell, LABEL_HEIGHT + len(rows) * cell), "white")
    draw = ImageDraw.Draw(grid)
    for column, label in enumerate(column_labels):
        draw.text((column * cell + 3, 1), label[: cell // 6], fill="black")
    for row_index, row in enumerate(rows):
        for column, image in enumerate(row):
            tile = image.convert("RGB").resize((cell, cell), Image.Resampling.LANCZOS)
            grid.paste(tile, (column * cell, LABEL_HEIGHT + row_index * cell))
    return grid


def save_png(image: Image.Image, path) -> None:
    """Save atomically, optimised: these files live in git."""
    from lanskap.io import atomic_file

    with atomic_file(path) as staging:
        image.save(staging, format="PNG", optimize=True)
