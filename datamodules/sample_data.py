"""The bundled sample dataset: small WebDataset shards of mp4 clips and stills made from real photographs.

Every clip is a camera move (pan or zoom) over a photograph that an installed package ships (scikit-image's
``skimage.data`` and matplotlib's sample data), often with a cut-out of another photograph moving across it,
so pixels have real image statistics and the motion is real, smooth motion. Captions say what is shown and
how it moves ("a tabby cat; camera pans left; a cup of coffee moves right"). The same seed gives the same
bytes. Written by ``fsvideo data sample --out DIR --seed S``.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import skimage.data
from matplotlib import cbook
from PIL import Image, ImageDraw, ImageFilter
from webdataset import TarWriter

FPS = 24
FRAME_SIZES = ((384, 216), (216, 384), (288, 288), (352, 264), (264, 352), (384, 192))
"""(width, height) of clips and stills: 16:9, 9:16, 1:1, 4:3, 3:4 and 2:1, long side at most 384."""
CAMERA_MOTIONS = ("pans left", "pans right", "pans up", "pans down", "zooms in", "zooms out", "stays still")
OBJECT_MOTIONS = {"moves right": (1, 0), "moves left": (-1, 0), "moves up": (0, -1), "moves down": (0, 1)}

# (loader, caption) of each background photograph.
BACKGROUNDS = {
    "astronaut": (skimage.data.astronaut, "an astronaut in an orange spacesuit"),
    "chelsea": (skimage.data.chelsea, "a tabby cat"),
    "coffee": (skimage.data.coffee, "a cup of coffee on a wooden table"),
    "rocket": (skimage.data.rocket, "a rocket on a launch pad at dusk"),
    "motorcycle": (lambda: skimage.data.stereo_motorcycle()[0], "a red motorcycle in a garage"),
    "hubble": (skimage.data.hubble_deep_field, "galaxies in deep space"),
    "retina": (skimage.data.retina, "a photograph of a retina"),
    "hopper": (
        lambda: np.asarray(Image.open(cbook.get_sample_data("grace_hopper.jpg"))),
        "a portrait of an officer",
    ),
}
# (background it is cut from, box x0, y0, x1, y1 in that photograph, caption) of each elliptical cut-out.
CUTOUTS = {
    "face": ("astronaut", (140, 13, 300, 167), "a smiling face"),
    "cup": ("coffee", (75, 7, 470, 380), "a cup of coffee"),
    "rocket": ("rocket", (255, 90, 365, 420), "a rocket"),
    "motorcycle": ("motorcycle", (74, 115, 676, 439), "a red motorcycle"),
    "cat": ("chelsea", (130, 10, 420, 290), "a cat's face"),
}


@dataclass(frozen=True)
class SampleDataset:
    """Where the sample shards are, as patterns ``VideoDataModule`` and ``fsvideo data inspect`` take."""

    root: Path
    train: str
    """Brace pattern of the training shards."""
    val: str
    """Path of the held-out validation shard."""
    train_samples: int
    val_samples: int


class _Photos:
    """Loads each photograph and cut-out once; backgrounds are shrunk to a short side of at most 512 px,
    still above the frame size at the deepest zoom, so per-frame resizing stays cheap."""

    def __init__(self) -> None:
        originals = {name: Image.fromarray(load()).convert("RGB") for name, (load, _) in BACKGROUNDS.items()}
        self.cutouts = {}
        for name, (source, box, _) in CUTOUTS.items():
            crop = originals[source].crop(box)
            mask = Image.new("L", crop.size, 0)
            ImageDraw.Draw(mask).ellipse((0, 0, crop.size[0] - 1, crop.size[1] - 1), fill=255)
            crop.putalpha(mask.filter(ImageFilter.GaussianBlur(max(crop.size) / 40)))
            self.cutouts[name] = crop
        self.backgrounds = {}
        for name, image in originals.items():
            scale = min(1.0, 512 / min(image.size))
            size = (round(image.size[0] * scale), round(image.size[1] * scale))
            self.backgrounds[name] = image.resize(size, Image.Resampling.LANCZOS)


def _max_window(image: Image.Image, aspect: float) -> tuple[float, float]:
    """Largest (width, height) of ratio ``aspect`` inside the photograph."""
    w, h = image.size
    return (w, w / aspect) if w / h < aspect else (h * aspect, h)


def _camera_boxes(image: Image.Image, size: tuple[int, int], motion: str, n: int, rng: np.random.Generator):
    """The photograph region seen in each of ``n`` frames, ``n×4`` (x0, y0, x1, y1)."""
    mw, mh = _max_window(image, size[0] / size[1])
    iw, ih = image.size
    t = np.linspace(0.0, 1.0, n)
    if motion.startswith("zooms"):
        scale = 1.0 - 0.4 * (t if motion == "zooms in" else 1 - t)
    else:
        scale = np.full(n, rng.uniform(0.65, 0.8))
    ww, wh = mw * scale, mh * scale
    # Pans sweep the centre across 90% of the free room; other moves sit at a random spot.
    dx, dy = {"pans left": (-1, 0), "pans right": (1, 0), "pans up": (0, -1), "pans down": (0, 1)}.get(
        motion, (0, 0)
    )
    sweep = 0.9 * (2 * t - 1)
    cx = iw / 2 + (iw - ww) / 2 * (dx * sweep if dx else rng.uniform(-0.8, 0.8))
    cy = ih / 2 + (ih - wh) / 2 * (dy * sweep if dy else rng.uniform(-0.8, 0.8))
    return np.stack([cx - ww / 2, cy - wh / 2, cx + ww / 2, cy + wh / 2], axis=1)


def _object_path(size: tuple[int, int], obj: Image.Image, motion: str, n: int, rng: np.random.Generator):
    """Top-left corner of the cut-out in each frame, moving across the frame in a straight line."""
    (w, h), (ow, oh) = size, obj.size
    dx, dy = OBJECT_MOTIONS[motion]
    t = np.linspace(0.0, 1.0, n)
    x = (
        (0.05 + 0.9 * (t if dx > 0 else 1 - t)) * (w - ow)
        if dx
        else np.full(n, rng.uniform(0.1, 0.9) * (w - ow))
    )
    y = (
        (0.05 + 0.9 * (t if dy > 0 else 1 - t)) * (h - oh)
        if dy
        else np.full(n, rng.uniform(0.1, 0.9) * (h - oh))
    )
    return np.round(np.stack([x, y], axis=1)).astype(int)


def _scaled_cutout(cutout: Image.Image, size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """The cut-out with its long side 35–50% of the frame's short side."""
    scale = min(size) * rng.uniform(0.35, 0.5) / max(cutout.size)
    return cutout.resize(
        (round(cutout.size[0] * scale), round(cutout.size[1] * scale)), Image.Resampling.LANCZOS
    )


def _encode_mp4(frames: list[np.ndarray]) -> bytes:
    """H.264 (yuv420p) mp4 at 24 fps, a keyframe every second so that seeking is exercised."""
    height, width = frames[0].shape[:2]
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        # One thread and no macroblock-tree lookahead: with either, x264's output bytes vary between runs.
        stream.options = {
            "crf": "23",
            "preset": "veryfast",
            "g": str(FPS),
            "x264-params": "rc-lookahead=0:mbtree=0",
        }
        stream.codec_context.thread_count = 1
        for index, array in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(array, format="rgb24")
            frame.pts, frame.time_base = index, Fraction(1, FPS)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return buffer.getvalue()


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _video_sample(photos: _Photos, rng: np.random.Generator) -> tuple[bytes, dict]:
    background = _pick(rng, list(BACKGROUNDS))
    size = _pick(rng, FRAME_SIZES)
    motion = _pick(rng, CAMERA_MOTIONS)
    num_frames = int(round(rng.uniform(2.0, 5.0) * FPS))
    image = photos.backgrounds[background]
    boxes = _camera_boxes(image, size, motion, num_frames, rng)
    caption = f"{BACKGROUNDS[background][1]}; camera {motion}"
    cutout, path = None, None
    if rng.random() < 0.7:
        name = _pick(rng, [c for c in CUTOUTS if CUTOUTS[c][0] != background])
        object_motion = _pick(rng, list(OBJECT_MOTIONS))
        cutout = _scaled_cutout(photos.cutouts[name], size, rng)
        path = _object_path(size, cutout, object_motion, num_frames, rng)
        caption += f"; {CUTOUTS[name][2]} {object_motion}"
    frames = []
    for i, box in enumerate(boxes):
        frame = image.resize(size, Image.Resampling.BILINEAR, box=tuple(box))
        if cutout is not None:
            frame.paste(cutout, tuple(path[i]), cutout)
        frames.append(np.asarray(frame))
    info = {
        "caption": caption,
        "fps": FPS,
        "width": size[0],
        "height": size[1],
        "num_frames": num_frames,
        "duration": num_frames / FPS,
        "source": background,
    }
    return _encode_mp4(frames), info


def _image_sample(photos: _Photos, rng: np.random.Generator) -> tuple[str, bytes, dict]:
    background = _pick(rng, list(BACKGROUNDS))
    size = _pick(rng, FRAME_SIZES)
    image = photos.backgrounds[background]
    (box,) = _camera_boxes(image, size, "stays still", 1, rng)
    frame = image.resize(size, Image.Resampling.BILINEAR, box=tuple(box))
    caption = BACKGROUNDS[background][1]
    if rng.random() < 0.5:
        name = _pick(rng, [c for c in CUTOUTS if CUTOUTS[c][0] != background])
        cutout = _scaled_cutout(photos.cutouts[name], size, rng)
        corner = (
            int(rng.integers(0, size[0] - cutout.size[0])),
            int(rng.integers(0, size[1] - cutout.size[1])),
        )
        frame.paste(cutout, corner, cutout)
        caption += f" with {CUTOUTS[name][2]}"
    extension = "png" if rng.random() < 0.3 else "jpg"
    buffer = io.BytesIO()
    frame.save(buffer, format="PNG" if extension == "png" else "JPEG", quality=90)
    return (
        extension,
        buffer.getvalue(),
        {"caption": caption, "width": size[0], "height": size[1], "source": background},
    )


def _write_shard(
    path: Path, split: str, index: int, videos: int, images: int, photos: _Photos, seed: int
) -> None:
    with TarWriter(str(path), mtime=0) as sink:
        for i in range(videos + images):
            rng = np.random.default_rng([seed, int(split == "val"), index, i])
            key = f"{split}{index:03d}_{i:03d}"
            if i < videos:
                data, info = _video_sample(photos, rng)
                sink.write({"__key__": key, "mp4": data, "json": json.dumps(info)})
            else:
                extension, data, info = _image_sample(photos, rng)
                sink.write({"__key__": key, extension: data, "json": json.dumps(info)})


def write_sample_dataset(
    out_dir: str | Path,
    seed: int = 0,
    train_shards: int = 4,
    videos_per_shard: int = 5,
    images_per_shard: int = 3,
    val_videos: int = 4,
    val_images: int = 2,
) -> SampleDataset:
    """Writes ``train-000000.tar …`` and a held-out ``val-000000.tar`` under ``out_dir``; the same seed gives
    the same bytes. Clips are 2–5 s at 24 fps, 192–384 px per side; stills are jpg or png."""
    if train_shards < 1 or videos_per_shard + images_per_shard < 1 or val_videos + val_images < 1:
        raise ValueError("the sample dataset needs at least one training shard and one sample per shard.")
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    photos = _Photos()
    for index in range(train_shards):
        _write_shard(
            root / f"train-{index:06d}.tar", "train", index, videos_per_shard, images_per_shard, photos, seed
        )
    _write_shard(root / "val-000000.tar", "val", 0, val_videos, val_images, photos, seed)
    last = train_shards - 1
    return SampleDataset(
        root=root,
        train=str(root / (f"train-{{000000..{last:06d}}}.tar" if last else "train-000000.tar")),
        val=str(root / "val-000000.tar"),
        train_samples=train_shards * (videos_per_shard + images_per_shard),
        val_samples=val_videos + val_images,
    )
