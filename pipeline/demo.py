"""The embedded demo corpus: procedurally drawn scenes encoded as real H.264 mp4 files.

Each clip shows 1-3 objects, each with a colour, a shape and a motion (direction, speed); some enter or
leave mid-clip. Captions are compositional ("a red circle moves left quickly while a blue square moves
up slowly, then a green triangle enters from the right"), so that binding colour to shape and to motion,
and order in time, matter. Val and test clips come in twins that swap the colours of two objects: the
twins' captions hold the same words, and only binding tells them apart.

Layout (docs/internal-api.md): OUT/videos/ID.mp4, OUT/boxes/ID.json (pixel box of every object in every
frame, null while out of view), OUT/manifest.csv (video_id,path,caption,split,twin,boxes), and
OUT/demo.json (the parameters; written last, so a corpus with it is complete).
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import av
import numpy as np

log = logging.getLogger(__name__)

WIDTH = HEIGHT = 128
FPS = 8
NUM_FRAMES = 24
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 70),
    "blue": (50, 90, 235),
    "yellow": (235, 215, 40),
    "purple": (160, 60, 210),
    "white": (240, 240, 240),
}
SHAPES = ("circle", "square", "triangle", "diamond")
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
ENTRY_SIDE = {"left": "right", "right": "left", "up": "bottom", "down": "top"}  # moving left enters from the right
SPEEDS: dict[str, float] = {"slowly": 1.3, "quickly": 3.2}  # pixels per frame
EVENTS = ("stays", "enters", "leaves")  # in view throughout / appears mid-clip / exits mid-clip


@dataclass(frozen=True)
class SceneObject:
    color: str
    shape: str
    direction: str
    speed: str
    event: str
    radius: int  # half the box side, pixels
    start: tuple[float, float]  # centre at frame `enters_at`
    enters_at: int  # first frame the object moves in from outside (0 = from the start, in view)

    def centre(self, frame: int) -> tuple[float, float]:
        dx, dy = DIRECTIONS[self.direction]
        step = SPEEDS[self.speed] * (frame - self.enters_at)
        return self.start[0] + dx * step, self.start[1] + dy * step

    def box(self, frame: int) -> list[float] | None:
        """Pixel box [x1, y1, x2, y2] clipped to the frame, None when out of view."""
        if frame < self.enters_at:
            return None
        cx, cy = self.centre(frame)
        r = self.radius
        x1, y1, x2, y2 = max(cx - r, 0.0), max(cy - r, 0.0), min(cx + r, WIDTH), min(cy + r, HEIGHT)
        if x2 - x1 < 1 or y2 - y1 < 1:
            return None
        return [round(x1, 2), round(y1, 2), round(x2, 2), round(y2, 2)]

    def phrase(self) -> str:
        subject = f"a {self.color} {self.shape}"
        if self.event == "enters":
            return f"{subject} enters {self.speed} from the {ENTRY_SIDE[self.direction]}"
        if self.event == "leaves":
            return f"{subject} moves {self.direction} {self.speed} and leaves"
        return f"{subject} moves {self.direction} {self.speed}"


def _place(rng: np.random.Generator, direction: str, speed: str, event: str, radius: int) -> tuple[tuple[float, float], int]:
    """Start centre and entry frame such that the object does what `event` says."""
    dx, dy = DIRECTIONS[direction]
    travel = SPEEDS[speed] * (NUM_FRAMES - 1)
    lo, hi = radius + 2, WIDTH - radius - 2
    across = rng.uniform(lo, hi)  # position on the axis the object does not move along
    if event == "enters":
        enters_at = int(rng.integers(4, 11))
        along = -radius + 1 if (dx + dy) > 0 else WIDTH + radius - 1  # just outside the entry edge
    elif event == "leaves":
        enters_at = 0
        # Far enough along that it is fully out before the end, with room to be seen first.
        exit_edge = WIDTH + radius if (dx + dy) > 0 else -radius
        along = exit_edge - (dx + dy) * travel * rng.uniform(0.55, 0.8)
        along = float(np.clip(along, lo, hi))
    else:
        enters_at = 0
        span = max(hi - lo - travel, 0.0)
        offset = rng.uniform(0, span) if span > 0 else 0.0
        along = lo + offset if (dx + dy) > 0 else hi - offset
    return ((along, across) if dx else (across, along)), enters_at


def _event_fits(event: str, speed: str) -> bool:
    # A slow object cannot cross the whole frame in 3 s: it may enter, but not leave from mid-frame.
    return not (event == "leaves" and speed == "slowly")


def random_scene(rng: np.random.Generator, num_objects: int) -> list[SceneObject]:
    colors = rng.choice(list(COLORS), size=num_objects, replace=False)
    shapes = rng.choice(SHAPES, size=num_objects, replace=False)
    objects = []
    for color, shape in zip(colors, shapes):
        direction = str(rng.choice(list(DIRECTIONS)))
        speed = str(rng.choice(list(SPEEDS)))
        event = str(rng.choice(EVENTS, p=[0.6, 0.2, 0.2]))
        if not _event_fits(event, speed):
            event = "stays"
        radius = int(rng.integers(9, 15))
        start, enters_at = _place(rng, direction, speed, event, radius)
        objects.append(SceneObject(str(color), str(shape), direction, speed, event, radius, start, enters_at))
    # Caption order = order of appearance, so "then" means later in time.
    return sorted(objects, key=lambda o: o.enters_at)


def caption(objects: list[SceneObject]) -> str:
    text = objects[0].phrase()
    for prev, obj in zip(objects, objects[1:]):
        joiner = ", then " if obj.enters_at > prev.enters_at else (" while " if prev is objects[0] else " and ")
        text += joiner + obj.phrase()
    return text


def swap_colours(objects: list[SceneObject]) -> list[SceneObject]:
    """The twin scene: objects 0 and 1 exchange colours; everything else is unchanged."""
    a, b = objects[0], objects[1]
    return [replace(a, color=b.color), replace(b, color=a.color), *objects[2:]]


def _background(rng: np.random.Generator) -> np.ndarray:
    base = rng.integers(20, 90, size=3)
    ramp = np.linspace(0, 1, WIDTH)[None, :, None] * rng.integers(-20, 21, size=3)  # [1, W, 3]
    return np.clip(base + ramp + np.zeros((HEIGHT, 1, 1)), 0, 255).astype(np.uint8)  # [H, W, 3]


def _mask(shape: str, cx: float, cy: float, r: int) -> np.ndarray:
    ys, xs = np.mgrid[0:HEIGHT, 0:WIDTH]
    dx, dy = xs + 0.5 - cx, ys + 0.5 - cy
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return (np.abs(dx) <= r) & (np.abs(dy) <= r)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= r
    # triangle, apex up: half-width grows from 0 at the top to r at the bottom
    return (dy >= -r) & (dy <= r) & (np.abs(dx) <= (dy + r) / 2)


def render(objects: list[SceneObject], background: np.ndarray) -> list[np.ndarray]:
    frames = []
    for t in range(NUM_FRAMES):
        img = background.copy()
        for obj in objects:
            if obj.box(t) is not None:
                cx, cy = obj.centre(t)
                img[_mask(obj.shape, cx, cy, obj.radius)] = COLORS[obj.color]
        frames.append(img)
    return frames


def write_mp4(path: Path, frames: list[np.ndarray]) -> None:
    """H.264 via PyAV, single-threaded so the bytes are deterministic; written under a temporary name."""
    partial = path.with_name(path.name + ".partial")
    with av.open(str(partial), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        stream.options = {"crf": "18", "threads": "1"}
        for img in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    os.replace(partial, path)


@dataclass(frozen=True)
class DemoVideo:
    video_id: str
    split: str
    twin: str
    objects: tuple[SceneObject, ...]
    background_seed: int


def plan_corpus(videos: int, seed: int, val_videos: int, test_videos: int) -> list[DemoVideo]:
    """Scenes for every video, deterministic in (videos, seed, val, test)."""
    if videos < 1:
        raise ValueError(f"--videos must be >= 1, got {videos}")
    for name, n in (("--val-videos", val_videos), ("--test-videos", test_videos)):
        if n < 0 or n % 2:
            raise ValueError(f"{name} must be an even number >= 0 (clips come in twins), got {n}")
    n_train = videos - val_videos - test_videos
    if n_train < 0:
        raise ValueError(f"--videos {videos} is fewer than val + test ({val_videos} + {test_videos})")
    planned: list[DemoVideo] = []
    for i in range(n_train):
        rng = np.random.default_rng([seed, i])
        n_obj = int(rng.choice([1, 2, 3], p=[0.2, 0.5, 0.3]))
        planned.append(DemoVideo(f"demo{i:06d}", "train", "", tuple(random_scene(rng, n_obj)), int(rng.integers(2**31))))
    for split, count, first in (("val", val_videos, n_train), ("test", test_videos, n_train + val_videos)):
        for i in range(first, first + count, 2):
            rng = np.random.default_rng([seed, i])
            objects = random_scene(rng, int(rng.choice([2, 3])))
            bg = int(rng.integers(2**31))
            a, b = f"demo{i:06d}", f"demo{i + 1:06d}"
            planned.append(DemoVideo(a, split, b, tuple(objects), bg))
            planned.append(DemoVideo(b, split, a, tuple(swap_colours(objects)), bg))
    return planned


def _leaves_at(boxes: list[list[float] | None]) -> int | None:
    """First frame out of view after being in view, or None."""
    return next((t for t in range(1, len(boxes)) if boxes[t - 1] and not boxes[t]), None)


def _write_video(root: Path, video: DemoVideo) -> dict[str, str]:
    objects = list(video.objects)
    frames = render(objects, _background(np.random.default_rng(video.background_seed)))
    write_mp4(root / "videos" / f"{video.video_id}.mp4", frames)
    sidecar = {
        "width": WIDTH, "height": HEIGHT, "fps": FPS, "num_frames": NUM_FRAMES,
        "objects": [
            {"color": o.color, "shape": o.shape, "speed": o.speed, "enters_at": o.enters_at,
             "motion": o.direction, "event": o.event, "leaves_at": _leaves_at(boxes), "boxes": boxes}
            for o, boxes in ((o, [o.box(t) for t in range(NUM_FRAMES)]) for o in objects)
        ],
    }
    boxes_path = root / "boxes" / f"{video.video_id}.json"
    boxes_path.write_text(json.dumps(sidecar))
    return {"video_id": video.video_id, "path": f"videos/{video.video_id}.mp4", "caption": caption(objects),
            "split": video.split, "twin": video.twin, "boxes": f"boxes/{video.video_id}.json"}


def default_holdout(videos: int) -> int:
    """10% of the corpus, even (twins), at least 2 when the corpus has room for it."""
    n = 2 * round(videos * 0.05)
    return n if n >= 2 or videos < 6 else 2


def make_demo_corpus(out: Path | str, videos: int = 200, seed: int = 0, val_videos: int | None = None,
                     test_videos: int | None = None, workers: int | None = None) -> Path:
    """Write the corpus into OUT (skipped when OUT already holds the same corpus); returns the manifest."""
    root = Path(out)
    val_videos = default_holdout(videos) if val_videos is None else val_videos
    test_videos = default_holdout(videos) if test_videos is None else test_videos
    params = {"videos": videos, "seed": seed, "val_videos": val_videos, "test_videos": test_videos,
              "width": WIDTH, "height": HEIGHT, "fps": FPS, "num_frames": NUM_FRAMES, "version": 1}
    done_marker, manifest = root / "demo.json", root / "manifest.csv"
    if done_marker.exists() and json.loads(done_marker.read_text()) == params and manifest.exists():
        log.info("demo corpus already in %s (%d videos, seed %d)", root, videos, seed)
        return manifest
    planned = plan_corpus(videos, seed, val_videos, test_videos)
    (root / "videos").mkdir(parents=True, exist_ok=True)
    (root / "boxes").mkdir(parents=True, exist_ok=True)
    workers = workers or min(len(os.sched_getaffinity(0)), 8)
    with ProcessPoolExecutor(max_workers=workers) as pool:
        rows = list(pool.map(_write_video, [root] * len(planned), planned, chunksize=16))
    partial = manifest.with_name("manifest.csv.partial")
    with open(partial, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["video_id", "path", "caption", "split", "twin", "boxes"])
        writer.writeheader()
        writer.writerows(rows)
    os.replace(partial, manifest)
    done_marker.write_text(json.dumps(params))
    log.info("wrote demo corpus: %d videos in %s", len(rows), root)
    return manifest


def corpus_kwargs(section: dict) -> dict[str, int]:
    """A dataset config's `demo:` section -> make_demo_corpus arguments (strict: unknown keys are an error)."""
    known = {"videos": 48, "seed": 0, "val_videos": None, "test_videos": None}
    unknown = sorted(set(section) - set(known))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in the dataset's demo section; known: {sorted(known)}")
    kwargs = {**known, **section}
    bad = {k: v for k, v in kwargs.items() if not (v is None or isinstance(v, int) and not isinstance(v, bool))}
    if bad:
        raise ValueError(f"demo section values must be integers, got {bad}")
    return kwargs


def demo_data_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="vlpcache demo-data", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="output folder (becomes the video root of the manifest)")
    parser.add_argument("--videos", type=int, default=200, help="number of clips in all splits (default 200)")
    parser.add_argument("--seed", type=int, default=0, help="corpus seed (default 0)")
    parser.add_argument("--val-videos", type=int, default=None, help="val clips, even (default: 10%%)")
    parser.add_argument("--test-videos", type=int, default=None, help="test clips, even (default: 10%%)")
    parser.add_argument("--workers", type=int, default=None, help="encoding processes (default: all cores)")
    args = parser.parse_args(argv)
    try:
        manifest = make_demo_corpus(args.out, args.videos, args.seed, args.val_videos, args.test_videos, args.workers)
    except ValueError as e:
        parser.error(str(e))
    log.info("manifest: %s", manifest)
    return 0
