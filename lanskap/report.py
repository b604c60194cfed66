"""Figures for people: labelled image grids (preview, comparisons) small enough to keep in git."""

from PIL import Image, ImageDraw

LABEL_HEIGHT = 14
SMOOTH_FROM = 40  # points in a loss series from which it is drawn with a moving mean


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


def save_loss_curves(curves: dict, path, title: str = "loss") -> None:
    """A small line chart of named (step, loss) tables, saved atomically as PNG for reports in git.

    `curves` maps a label (e.g. "train", "validation") to a DataFrame with `step` and `loss` columns. A long
    per-step series (the diffusion loss is noisy: each step draws new timesteps) is drawn faint, under its
    moving average.
    """
    import matplotlib

    matplotlib.use("Agg")  # headless: stages run without a display
    from matplotlib import pyplot

    from lanskap.io import atomic_file

    figure, axes = pyplot.subplots(figsize=(5, 3), dpi=100)
    for label, table in curves.items():
        if len(table) < SMOOTH_FROM:
            axes.plot(table["step"], table["loss"], label=label, marker=".")
            continue
        (raw,) = axes.plot(table["step"], table["loss"], alpha=0.25, linewidth=0.8)
        window = len(table) // 20
        axes.plot(table["step"], table["loss"].rolling(window, min_periods=1).mean(), color=raw.get_color(),
                  label=f"{label} (moving mean of {window})")
    axes.set(xlabel="step", ylabel="loss", title=title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    with atomic_file(path) as staging:
        # No Software metadata: the same curves must give the same bytes, so git sees no change.
        figure.savefig(staging, format="png", metadata={"Software": None})
    pyplot.close(figure)
