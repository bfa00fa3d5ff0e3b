"""`vlpcache show OUT VIDEO_ID --png FILE [--checkpoint RUN]`: the video's sampled frames with their
stored boxes and, with a checkpoint, which regions each phrase (or word) of the caption attends to.

Frames are decoded again from the video the store was extracted from (OUT/extract_config.yaml names the
manifest; --video overrides the file) with the store's own sampling plan, so they are the frames the
features came from. The trainer is imported only when --checkpoint is given.
"""
from __future__ import annotations

import argparse
import logging
import sys
import textwrap
from pathlib import Path

import numpy as np
import yaml

log = logging.getLogger(__name__)
PALETTE = ["#e41a1c", "#377eb8", "#4daf4a", "#ff7f00", "#984ea3", "#a65628", "#f781bf", "#999999"]


class ShowError(ValueError):
    """The video cannot be shown as asked; the message says what is missing and what to pass."""


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="vlpcache show", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="store folder written by `vlpcache extract`")
    p.add_argument("video_id")
    p.add_argument("--png", required=True, help="image file to write")
    p.add_argument("--checkpoint", help="run folder or checkpoint of `vlpcache train`: adds phrase/word attention")
    p.add_argument("--caption", help="caption to attend with (default: the stored one)")
    p.add_argument("--video", help="the video file (default: from the manifest named in OUT/extract_config.yaml)")
    return p.parse_args(argv)


def _extract_config(out: Path) -> dict:
    path = out / "extract_config.yaml"
    if not path.is_file():
        raise ShowError(f"{path} not found: the store was not written by `vlpcache extract`; pass --video and "
                        "a store with extract_config.yaml")
    return yaml.safe_load(path.read_text())


def _video_path(cfg: dict, video_id: str, override: str | None) -> tuple[str, tuple[float, float] | None, tuple[int, int] | None]:
    from pipeline.manifest import iter_manifest

    if override:
        return override, None, None
    inp = cfg.get("input", {})
    rows = iter_manifest(inp["manifest"], inp.get("video_root") or None, inp.get("format", "auto"),
                         inp.get("path_template", "{video_root}/{page_dir}/{videoid}.mp4"))
    for row in rows:
        if row.video_id == video_id:
            return row.path, row.window, row.span
    raise ShowError(f"video {video_id!r} is not in the manifest {inp['manifest']}; pass --video FILE")


def decode_frames(out: Path, video_id: str, override: str | None) -> list[np.ndarray]:
    from extractors.config import ExtractorConfig
    from extractors.decode import decode_clip

    cfg = _extract_config(out)
    sampling = ExtractorConfig.from_dict(cfg["extractor"]).sampling
    path, window, span = _video_path(cfg, video_id, override)
    if not Path(path).is_file():
        raise ShowError(f"video file {path} of {video_id!r} not found; pass --video FILE")
    return decode_clip(path, sampling, window, span).frames


def _draw_boxes(ax, frame: np.ndarray, boxes: np.ndarray, colors: list[str], widths: list[float]) -> None:
    from matplotlib.patches import Rectangle

    H, W = frame.shape[:2]
    ax.imshow(frame)
    for (x1, y1, x2, y2), color, width in zip(boxes, colors, widths):  # boxes normalised to [0, 1]
        if width > 0:
            ax.add_patch(Rectangle((x1 * W, y1 * H), (x2 - x1) * W, (y2 - y1) * H, fill=False, edgecolor=color,
                                   linewidth=width))
    ax.axis("off")


def render(frames: list[np.ndarray], arrays: dict, caption: str, png: Path, attention=None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes, boxes, times = arrays["region_classes"], arrays["region_boxes"], arrays["frame_times"]  # [T, K]...
    T = len(frames)
    rows = 1 + (len(attention.units) if attention else 0)
    fig, axes = plt.subplots(rows, T, figsize=(1.6 * T, 1.8 * rows), squeeze=False)
    for t in range(T):
        real = classes[t] >= 0
        _draw_boxes(axes[0, t], frames[t], boxes[t][real], [PALETTE[int(c) % len(PALETTE)] for c in classes[t][real]],
                    [1.5] * int(real.sum()))
        axes[0, t].set_title(f"t={times[t]:.2f}s", fontsize=7)
    if attention:
        for u, label in enumerate(attention.units):
            weight = np.zeros(classes.shape)  # [T, K] attention reaching each box
            for r, slots in enumerate(attention.slots):
                for t, k in slots:
                    weight[t, k] += attention.weights[u, r]
            for t in range(T):
                _draw_boxes(axes[1 + u, t], frames[t], boxes[t], ["yellow"] * len(boxes[t]),
                            list(4.0 * weight[t] / max(weight.max(), 1e-6)))
            axes[1 + u, 0].set_title(label[:60], fontsize=7, loc="left")
    title = caption + (f"  (S_loc = {attention.score:.2f})" if attention else "")
    fig.suptitle(textwrap.fill(title, 20 * T), fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    from stores import StoreError, open_store

    out = Path(args.out)
    try:
        arrays = open_store(out)[args.video_id]
        caption = args.caption or arrays["caption"]
        frames = decode_frames(out, args.video_id, args.video)
        if len(frames) != len(arrays["frame_times"]):
            raise ShowError(f"decoded {len(frames)} frames but the store holds {len(arrays['frame_times'])} for "
                            f"{args.video_id!r}: the video file is not the one that was extracted")
        attention = None
        if args.checkpoint:
            from train.attention import caption_attention

            attention = caption_attention(args.checkpoint, arrays, caption)
        render(frames, arrays, caption, Path(args.png), attention)
    except (ShowError, StoreError, KeyError, ValueError) as e:
        print(f"vlpcache show: {e}", file=sys.stderr)
        return 2
    log.info("wrote %s", args.png)
    return 0
