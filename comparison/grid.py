"""Draw the comparison grid: rows = methods/stacks, columns = scales or seeds, numbers under each cell (PIL)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFont

BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)
MUTED = (90, 90, 90)
PAD = 8


@dataclass
class Cell:
    image: Image.Image
    caption: list[str] = field(default_factory=list)


def to_pil(image) -> Image.Image:
    """A PIL image from a PIL image, or an array/tensor [H, W, 3] (or [H, W]) in [0, 1]."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    array = image.detach().cpu().numpy() if hasattr(image, "detach") else np.asarray(image)
    array = np.clip(array.astype(np.float32), 0.0, 1.0)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    return Image.fromarray((array * 255.0 + 0.5).astype(np.uint8), "RGB")


def tile(images: list, columns: int, gap: int = 2) -> Image.Image:
    """Images of equal size side by side, ``columns`` per line."""
    pictures = [to_pil(i) for i in images]
    width, height = pictures[0].size
    lines = (len(pictures) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * width + (columns - 1) * gap, lines * height + (lines - 1) * gap), (200,) * 3)
    for index, picture in enumerate(pictures):
        sheet.paste(picture, ((index % columns) * (width + gap), (index // columns) * (height + gap)))
    return sheet


FONT_FILES = ("DejaVuSans.ttf", "LiberationSans-Regular.ttf", "Arial.ttf", "arial.ttf", "Helvetica.ttc",
              "segoeui.ttf")
# PIL's built-in font lacks these glyphs
PLAIN = str.maketrans({"β": "beta", "²": "2", "é": "e", "≥": ">=", "σ": "sigma", "η": "eta", "·": "-", "—": "-",
                       "×": "x", "±": "+-"})


def font(size: int = 13) -> ImageFont.ImageFont:
    for name in FONT_FILES:
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font
        return ImageFont.load_default()


def _text(text: str, typeface) -> str:
    return text if isinstance(getattr(typeface, "path", None), str) else text.translate(PLAIN)


def _text_size(draw: ImageDraw.ImageDraw, text: str, typeface) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), _text(text, typeface) or " ", font=typeface)
    return right - left, bottom - top


def _wrap(draw, text: str, typeface, width: int) -> list[str]:
    lines, current = [], ""
    for word in text.split(" "):
        candidate = f"{current} {word}".strip()
        if current and _text_size(draw, candidate, typeface)[0] > width:
            lines.append(current)
            current = word
        else:
            current = candidate
    return lines + [current] if current else lines


def render_grid(cells: list[list[Cell]], row_labels: list[str], column_labels: list[str], title: str = "",
                footer: str = "", label_width: int = 150) -> Image.Image:
    """The grid as one RGB image."""
    if not cells or not cells[0]:
        raise ValueError("compare: nothing to draw (no rows or no columns)")
    label_font, caption_font, title_font = font(13), font(11), font(15)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    cell_w = max(c.image.size[0] for row in cells for c in row)
    cell_h = max(c.image.size[1] for row in cells for c in row)
    line_h = _text_size(probe, "Ag", caption_font)[1] + 3
    caption_lines = max(len(c.caption) for row in cells for c in row)
    column_w = max([cell_w] + [_text_size(probe, line, caption_font)[0] for row in cells for c in row
                               for line in c.caption]) + PAD
    row_h = cell_h + caption_lines * line_h + 2 * PAD
    title_h = (_text_size(probe, title, title_font)[1] + 2 * PAD) if title else 0
    header_h = _text_size(probe, "Ag", label_font)[1] + 2 * PAD
    footer_lines = _wrap(probe, footer, caption_font, label_width + column_w * len(cells[0])) if footer else []
    width = label_width + column_w * len(cells[0]) + PAD
    height = title_h + header_h + row_h * len(cells) + len(footer_lines) * line_h + PAD
    sheet = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((PAD, PAD), _text(title, title_font), fill=INK, font=title_font)
    top = title_h
    for j, label in enumerate(column_labels):
        text_w = _text_size(draw, label, label_font)[0]
        draw.text((label_width + j * column_w + (cell_w - text_w) // 2, top + PAD), _text(label, label_font),
                  fill=INK, font=label_font)
    top += header_h
    for i, row in enumerate(cells):
        y = top + i * row_h
        lines = _wrap(draw, row_labels[i], label_font, label_width - 2 * PAD)
        text_h = _text_size(draw, "Ag", label_font)[1] + 4
        label_y = y + PAD + max(0, (cell_h - len(lines) * text_h) // 2)
        for k, line in enumerate(lines):
            draw.text((PAD, label_y + k * text_h), _text(line, label_font), fill=INK, font=label_font)
        for j, cell in enumerate(row):
            x = label_width + j * column_w
            sheet.paste(cell.image, (x, y + PAD))
            for k, line in enumerate(cell.caption):
                draw.text((x, y + PAD + cell_h + 2 + k * line_h), _text(line, caption_font), fill=MUTED,
                          font=caption_font)
        if i:
            draw.line([(PAD, y), (width - PAD, y)], fill=(225, 225, 225))
    y = top + len(cells) * row_h
    for k, line in enumerate(footer_lines):
        draw.text((PAD, y + k * line_h), _text(line, caption_font), fill=MUTED, font=caption_font)
    return sheet
