"""Contact sheets: one row of thumbnails per query or duplicate group, with a caption under each.

Thumbnails are read from the images' URIs through the pipeline's reader (local, gs://, http...), many
at once; an image that cannot be read or decoded gets a grey tile that says so, never a missing row.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import io
from typing import Optional, Sequence

from pipeline.storage import write_bytes
from transforms.decode import PreprocessConfig, decode_thumbnail
from transforms.uri_reader import ReadConfig, read_uri

THUMB = 128  # the square each thumbnail is fitted into
MAX_COLUMNS = 10  # a longer row (a large duplicate group) wraps onto the next lines
PAD = 8
LINE = 12
CAPTION_LINES = 2
BACKGROUND = (255, 255, 255)
WARNING = (200, 0, 0)
UNREADABLE = (160, 160, 160)
READ_THREADS = 16
THUMBNAILS = PreprocessConfig(image_size=THUMB, background=BACKGROUND)


@dataclasses.dataclass(frozen=True)
class Tile:
    uri: Optional[str]  # None: nothing to show (an unknown id)
    caption: tuple  # lines under the thumbnail


def query_rows(asked: Sequence[str], hits: Sequence, failures: Sequence, by_image: bool) -> list:
    """A row per query, in the order asked: the query image (for image queries), then its hits in rank order."""
    rows = {query: [Tile(query, ("query", query))] if by_image else [] for query in asked}
    for hit in hits:
        rows[hit.query].append(Tile(hit.uri, (hit.id, f"{hit.similarity:.4f}")))
    for query, _ in failures:  # an unanswered query keeps its row, saying so
        rows[query] = [Tile(query if by_image else None, ("not queried", query))]
    return list(rows.values())


def group_rows(groups) -> list:
    """A row per duplicate group (a table of duplicates.GROUPS_SCHEMA), its first member first."""
    rows: dict = {}
    for member in groups.to_pylist():
        row = rows.setdefault(member["group"], [])
        same = " same bytes" if member["same_bytes"] and row else ""
        row.append(Tile(member["uri"], (member["id"], f"{member['similarity']:.4f}{same}")))
    return list(rows.values())


def _wrap_text(text: str, font, width: int) -> list:
    from PIL import Image, ImageDraw

    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if line and measure.textlength(candidate, font=font) > width:
            lines.append(line)
            candidate = word
        line = candidate
    return lines + [line] if line else lines


def tile_box(row: int, column: int) -> tuple:
    """(left, top, right, bottom) of the thumbnail square of a tile."""
    left = PAD + column * (THUMB + PAD)
    top = PAD + row * (THUMB + CAPTION_LINES * LINE + 2 * PAD)
    return left, top, left + THUMB, top + THUMB


def _thumbnail(uri: Optional[str], read: ReadConfig):
    """The image fitted into THUMB x THUMB (aspect kept), or None when it cannot be read or decoded (or is over
    the pipeline's pixel limit: a decompression bomb among the hits must not take the sheet down)."""
    if uri is None:
        return None
    try:
        return decode_thumbnail(read_uri(uri, read), THUMB, THUMBNAILS)
    except Exception:  # unreadable or undecodable: the tile says so
        return None


def _fit(draw, text: str, font, width: int) -> str:
    """`text`, or its end after "...": ids and paths differ in their last part (photos/ho... tells nothing)."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength("..." + text, font=font) > width:
        text = text[1:]
    return "..." + text


def _wrapped(rows: Sequence[Sequence[Tile]]) -> list:
    """Rows of at most MAX_COLUMNS tiles: a long row continues on the next lines."""
    return [list(row[start:start + MAX_COLUMNS]) for row in rows for start in range(0, max(len(row), 1), MAX_COLUMNS)]


def draw_contact_sheet(rows: Sequence[Sequence[Tile]], path: str, read: ReadConfig = ReadConfig(),
                       warning: Optional[str] = None) -> None:
    """Writes a PNG at `path` (local or any Beam filesystem) with one row per entry of `rows` (wrapped after
    MAX_COLUMNS tiles), and `warning` in red under them: a sheet gets shared without the command's output."""
    from PIL import Image, ImageDraw, ImageFont

    rows = _wrapped(rows)
    columns = max((len(row) for row in rows), default=1)
    width = tile_box(0, columns)[0]
    height = tile_box(len(rows), 0)[1]
    font = ImageFont.load_default()
    warning_lines = _wrap_text(f"WARNING: {warning}", font, width - 2 * PAD) if warning else []
    sheet = Image.new("RGB", (width, height + len(warning_lines) * LINE + (PAD if warning_lines else 0)), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    for number, line in enumerate(warning_lines):
        draw.text((PAD, height + number * LINE), line, fill=WARNING, font=font)
    tiles = [(r, c, tile) for r, row in enumerate(rows) for c, tile in enumerate(row)]
    with concurrent.futures.ThreadPoolExecutor(READ_THREADS) as pool:
        thumbnails = pool.map(lambda item: _thumbnail(item[2].uri, read), tiles)
        for (r, c, tile), thumbnail in zip(tiles, thumbnails):
            left, top, right, bottom = tile_box(r, c)
            if thumbnail is None:
                draw.rectangle((left, top, right - 1, bottom - 1), fill=UNREADABLE)
                draw.text((left + 4, top + THUMB // 2 - LINE // 2), "unreadable" if tile.uri else "not found",
                          fill=(0, 0, 0), font=font)
            else:
                sheet.paste(thumbnail, (left + (THUMB - thumbnail.width) // 2, top + (THUMB - thumbnail.height) // 2))
            for line, text in enumerate(tile.caption[:CAPTION_LINES]):
                draw.text((left, bottom + PAD // 2 + line * LINE), _fit(draw, str(text), font, THUMB),
                          fill=(0, 0, 0), font=font)
    buffer = io.BytesIO()
    sheet.save(buffer, "PNG")
    write_bytes(path, buffer.getvalue())
