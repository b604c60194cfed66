"""Figures for people: labelled image grids (preview, comparisons) small enough to keep in git."""

from PIL import Image, ImageDraw, ImageFont

FONT_PX = 15  # Pillow's built-in scalable font: the same glyphs (and bytes) on every machine with the locked Pillow
PADDING = 6
ROW_LABEL_WIDTH = 360  # px of wrapped text (a prompt) beside each row: about 45 characters a line
COLUMN_LABEL_LINES = 3  # a column label wraps within its cell up to this, then is cut: prompts go in row labels
SMOOTH_FROM = 40  # points in a loss series from which it is drawn with a moving mean


def label_font() -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=FONT_PX)


def fit_text(text: str, font, width: int) -> str:
    """`text` cut to `width` px, ending in an ellipsis when cut."""
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "…") > width:
        text = text[:-1]
    return text + "…"


def wrap_text(text: str, font, width: int) -> list[str]:
    """Greedy word wrap to `width` px; a word longer than a line is cut."""
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(fit_text(word, font, width))
    return lines


def column_label_lines(label: str, font, width: int) -> list[str]:
    lines = wrap_text(label, font, width)
    if len(lines) <= COLUMN_LABEL_LINES:
        return lines
    return lines[: COLUMN_LABEL_LINES - 1] + [fit_text(" ".join(lines[COLUMN_LABEL_LINES - 1 :]), font, width)]


def image_grid(
    rows: list[list[Image.Image]],
    column_labels: list[str],
    cell: int = 128,
    row_labels: list[str] | None = None,
    row_header: str = "",
) -> Image.Image:
    """Rows of images fitted into `cell` px squares (aspect ratio kept, centred on white) under a header of column
    labels (wrapped in the cell's width).

    With `row_labels` (one per row, e.g. its prompt), a text column on the left holds each label wrapped in full,
    headed `row_header`; a row grows taller than `cell` when its label needs it."""
    font = label_font()
    line_height = sum(font.getmetrics()) + 2
    text_width = ROW_LABEL_WIDTH if row_labels else 0
    wrapped = (
        [wrap_text(label, font, text_width - 2 * PADDING) for label in row_labels] if row_labels else [[]] * len(rows)
    )
    heights = [max(cell, len(lines) * line_height + 2 * PADDING) for lines in wrapped]
    headers = [column_label_lines(label, font, cell - 2 * PADDING) for label in column_labels]
    header = max(map(len, headers), default=1) * line_height + 2 * PADDING
    grid = Image.new("RGB", (text_width + len(column_labels) * cell, header + sum(heights)), "white")
    draw = ImageDraw.Draw(grid)
    if row_labels:
        draw.text((PADDING, PADDING), row_header, fill="black", font=font)
    for column, lines in enumerate(headers):
        for line_index, line in enumerate(lines):
            draw.text(
                (text_width + column * cell + PADDING, PADDING + line_index * line_height),
                line,
                fill="black",
                font=font,
            )
    top = header
    for row_index, row in enumerate(rows):
        for line_index, line in enumerate(wrapped[row_index]):
            draw.text((PADDING, top + PADDING + line_index * line_height), line, fill="black", font=font)
        for column, image in enumerate(row):
            scale = cell / max(image.size)  # a square fills its cell; a panorama keeps its shape
            fitted = max(1, round(image.width * scale)), max(1, round(image.height * scale))
            tile = image.convert("RGB").resize(fitted, Image.Resampling.LANCZOS)
            grid.paste(tile, (text_width + column * cell + (cell - tile.width) // 2, top + (cell - tile.height) // 2))
        if row_labels and row_index:  # a rule between labels, which may run taller than their images
            draw.line([(0, top), (text_width - 1, top)], fill="#bbbbbb")
        top += heights[row_index]
    return grid


def save_png(image: Image.Image, path) -> None:
    """Save atomically, optimised: these files live in git."""
    from lanskap.core.io import atomic_file

    with atomic_file(path) as staging:
        image.save(staging, format="PNG", optimize=True)


def save_loss_curves(curves: dict, path, title: str = "loss") -> None:
    """A small line chart of named (step, loss) tables, saved atomically as PNG for reports in git.

    `curves` maps a label (e.g. "train", "validation") to a DataFrame with `step` and `loss` columns. A long
    per-step series (the diffusion loss is noisy: each step draws new timesteps) is drawn faint, under its
    moving average.
    """
    import matplotlib

    matplotlib.use("Agg")  # headless: stages run without a display
    from matplotlib import pyplot

    from lanskap.core.io import atomic_file

    figure, axes = pyplot.subplots(figsize=(5, 3), dpi=100)
    for label, table in curves.items():
        if len(table) < SMOOTH_FROM:
            axes.plot(table["step"], table["loss"], label=label, marker=".")
            continue
        (raw,) = axes.plot(table["step"], table["loss"], alpha=0.25, linewidth=0.8)
        window = len(table) // 20
        axes.plot(
            table["step"],
            table["loss"].rolling(window, min_periods=1).mean(),
            color=raw.get_color(),
            label=f"{label} (moving mean of {window})",
        )
    axes.set(xlabel="step", ylabel="loss", title=title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    with atomic_file(path) as staging:
        # No Software metadata: the same curves must give the same bytes, so git sees no change.
        figure.savefig(staging, format="png", metadata={"Software": None})
    pyplot.close(figure)
