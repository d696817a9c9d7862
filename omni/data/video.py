"""Video-caption corpus: real mp4 clips of a Tux Paint stamp moving across a background.

``omni data build video`` renders, for each chosen stamp, one clip per direction (left, right,
up, down) and speed (slowly, quickly), captioned "a pickup truck moves left quickly", with the
stamp's own sound effect (``<name>.ogg``) as the AAC audio track when it has one (clips of
stamps without a sound have no audio track; the row says ``"has_audio": false``).

What makes the task temporal: the stamp is never mirrored to face its motion, and a clip moving
left visits the same positions as the one moving right, in reverse order; so only the order of
the frames tells the direction. Speed shows as distance travelled: ``quickly`` crosses the whole
frame in the clip, ``slowly`` half of it, centred. Sample all frames, or an even number of them
(``omni.media.video``'s rule is symmetric under time reversal), and a left clip's sampled
positions are exactly a right clip's, reversed.

Stamps: those whose English caption is a short noun phrase ("A frog.", "The letter Q.", at
most ``max_caption_words`` words, no other punctuation); stamps with a sound come first, then
by id; ``max_stamps`` takes the first ones.

Splits hold out stamp/direction pairs: the *i*-th rendered stamp (in that order) puts its
``DIRECTIONS[i % 4]`` clips in ``test`` and, when ``i % 4 == 0``, its ``DIRECTIONS[(i + 1) % 4]``
clips in ``val``; the rest is ``train``. Every direction is held out equally often; every test
pair's stamp and direction both occur in training, never together. Rows: ``{"id", "video", "caption",
"category", "split", "stamp", "noun", "direction", "speed", "has_audio"}``; ``video`` is
relative to the manifest's folder.
"""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path

import torch

from omni.data.images import STAMPS_DIR, SVG_INSTALL, Stamp, find_stamps, stamp_rgba, svg_available
from omni.io import atomic_write_json, exclusive, write_jsonl
from omni.media import MediaError
from omni.media.video import read_audio, write_video
from omni.progress import progress as progress_bar

log = logging.getLogger(__name__)

DIRECTIONS = ("left", "right", "up", "down")
OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}
SPEEDS = {"slowly": 0.5, "quickly": 1.0}  # fraction of the free width/height crossed in one clip
SAMPLE_RATE = 16000
_NOUN = re.compile(r"^(A|An|The)\s+([^.,;:!?()\"]+?)\.?$")


def noun_phrase(caption: str, max_words: int = 5) -> str | None:
    """"A Pickup truck." -> "a Pickup truck"; ``None`` for a caption that is not a short noun phrase."""
    m = _NOUN.match(caption.strip())
    if not m or len(caption.split()) > max_words:
        return None
    return f"{m.group(1).lower()} {m.group(2).strip()}"


def direction_of(caption: str) -> str | None:
    """The one direction word in a (generated) caption, or ``None`` when it names none or several:
    what direction accuracy scores against a row's ``direction``."""
    words = set(re.findall(r"[a-z]+", caption.lower()))
    found = [d for d in DIRECTIONS if d in words]
    return found[0] if len(found) == 1 else None


def _rng(key: str) -> torch.Generator:
    return torch.Generator().manual_seed(int.from_bytes(hashlib.sha1(key.encode()).digest()[:8], "big") >> 1)


def _background(size: int, g: torch.Generator) -> torch.Tensor:
    """A soft vertical gradient between two random light colours, float (3, size, size)."""
    top, bottom = 120 + 135 * torch.rand(3, generator=g), 120 + 135 * torch.rand(3, generator=g)
    t = torch.linspace(0, 1, size).view(1, size, 1)
    return (top.view(3, 1, 1) * (1 - t) + bottom.view(3, 1, 1) * t).expand(3, size, size).contiguous()


def render_clip(rgb: torch.Tensor, alpha: torch.Tensor, direction: str, speed: str, size: int,
                num_frames: int, g: torch.Generator) -> torch.Tensor:
    """uint8 frames (num_frames, 3, size, size) of the premultiplied stamp moving over a background."""
    if direction not in DIRECTIONS or speed not in SPEEDS:
        raise ValueError(f"direction must be one of {DIRECTIONS} and speed one of {tuple(SPEEDS)}")
    sh, sw = alpha.shape[1:]
    background = _background(size, g)
    free_x, free_y = size - sw, size - sh
    along_free = free_x if direction in ("left", "right") else free_y
    across_free = free_y if direction in ("left", "right") else free_x
    across = int(torch.randint(0, across_free + 1, (1,), generator=g))  # fixed off-axis position
    span = SPEEDS[speed] * along_free
    lo = (along_free - span) / 2
    frames = []
    for k in range(num_frames):
        u = k / max(1, num_frames - 1)
        pos = round(lo + (u if direction in ("right", "down") else 1 - u) * span)
        x, y = (pos, across) if direction in ("left", "right") else (across, pos)
        frame = background.clone()
        region = frame[:, y:y + sh, x:x + sw]
        frame[:, y:y + sh, x:x + sw] = rgb + region * (1 - alpha)
        frames.append(frame)
    return torch.stack(frames).round().clamp(0, 255).to(torch.uint8)


def _sound(stamp: Stamp, duration: float) -> torch.Tensor | None:
    """The stamp's sound at 16 kHz, cut or zero-padded to ``duration``, with a 20 ms fade-out."""
    if stamp.sound is None:
        return None
    track = read_audio(stamp.sound, sample_rate=SAMPLE_RATE)
    n = round(duration * SAMPLE_RATE)
    wav = torch.zeros(n)
    take = min(n, track.waveform.shape[0])
    wav[:take] = track.waveform[:take]
    fade = min(take, SAMPLE_RATE // 50)
    if fade:
        wav[take - fade:take] *= torch.linspace(1, 0, fade)
    return wav


def build_video_corpus(out: str | Path, stamps_dir: str | Path = STAMPS_DIR, size: int = 64, fps: float = 8.0,
                       duration: float = 2.0, max_stamps: int | None = None, stamp_scale: float = 0.45,
                       max_caption_words: int = 5, with_audio: bool = True, seed: int = 0) -> dict:
    """Render the moving-stamp clips and write ``train/val/test.jsonl`` under ``out``; returns (and
    writes to ``out/corpus.json``) the counts."""
    if size < 16 or size % 2:
        raise ValueError(f"size must be an even number >= 16 (H.264 yuv420p), got {size}")
    num_frames = round(fps * duration)
    if num_frames < 2:
        raise ValueError(f"fps x duration must give at least 2 frames, got {fps} x {duration}")
    if not 0.1 <= stamp_scale <= 0.9:
        raise ValueError(f"stamp_scale must be in [0.1, 0.9], got {stamp_scale}")
    out = Path(out)
    stamps = find_stamps(stamps_dir)
    can_svg = svg_available()
    eligible = [s for s in stamps if noun_phrase(s.caption, max_caption_words)
                and (can_svg or s.image.suffix != ".svg")]
    if not can_svg:
        log.warning("SVG stamps skipped: rasterising them needs cairosvg (%s)", SVG_INSTALL)
    eligible.sort(key=lambda s: (s.sound is None, s.id))
    chosen = eligible[:max_stamps] if max_stamps else eligible
    with exclusive(out, "video corpus"):  # a second build of this folder is refused, not interleaved
        rows: dict[str, list[dict]] = {"train": [], "val": [], "test": []}
        bad: list[str] = []
        stamp_px = max(4, int(stamp_scale * size))
        i = 0  # stamps rendered so far: the held-out rotation skips bad stamps
        clips = len(DIRECTIONS) * len(SPEEDS)
        for stamp in progress_bar(chosen, desc=f"rendering {clips} clips a stamp into {out}", unit="stamp"):
            try:
                rgb, alpha = stamp_rgba(stamp, stamp_px)
                sound = _sound(stamp, duration) if with_audio else None
            except MediaError as e:
                bad.append(str(e))
                log.warning("skipping stamp %s", e)
                continue
            held = {DIRECTIONS[i % 4]: "test"}
            if i % 4 == 0:
                held[DIRECTIONS[(i + 1) % 4]] = "val"
            noun = noun_phrase(stamp.caption, max_caption_words)
            slug = stamp.id.replace("/", "__")
            for direction in DIRECTIONS:
                for speed in SPEEDS:
                    clip_id = f"{slug}__{direction}_{speed}"
                    g = _rng(f"{seed}:{clip_id}")
                    frames = render_clip(rgb, alpha, direction, speed, size, num_frames, g)
                    rel = Path("videos") / f"{clip_id}.mp4"
                    write_video(out / rel, frames, fps, audio=sound, sample_rate=SAMPLE_RATE)
                    split = held.get(direction, "train")
                    rows[split].append({"id": clip_id, "video": rel.as_posix(),
                                        "caption": f"{noun} moves {direction} {speed}",
                                        "category": stamp.category, "split": split, "stamp": stamp.id,
                                        "noun": noun, "direction": direction, "speed": speed,
                                        "has_audio": sound is not None})
            i += 1
        if not rows["train"]:
            raise ValueError(f"{stamps_dir}: no stamp could be rendered")
        counts = {s: write_jsonl(out / f"{s}.jsonl", r) for s, r in rows.items()}
        stats = {"stamps_found": len(stamps), "stamps_eligible": len(eligible),
                 "stamps_used": len(chosen) - len(bad),
                 "stamps_with_sound": sum(s.sound is not None for s in chosen), "bad": len(bad),
                 "clips": sum(counts.values()), "size": size, "fps": fps, "duration": duration,
                 "frames_per_clip": num_frames, **counts}
        atomic_write_json(out / "corpus.json", stats)
        log.debug("wrote %s to %s", stats, out)  # `omni data build` prints it
        return stats
