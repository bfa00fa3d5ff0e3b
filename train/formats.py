"""Zero-shot evaluation manifests: MSR-VTT (1k-A), DiDeMo and Charades-STA annotation files -> the
generic manifest `video_id,path,caption[,start,end]` that `vlpcache extract` reads (start/end = the
window to decode, seconds). Users with those videos extract it and run `vlpcache eval --split ""`.

    python -m train.formats msrvtt MSRVTT_JSFUSION_test.csv --out msrvtt_1ka.csv
    python -m train.formats msrvtt MSRVTT_data.json --test-csv MSRVTT_JSFUSION_test.csv --out msrvtt_1ka_all.csv
    python -m train.formats didemo test_data.json --out didemo.csv [--moments]
    python -m train.formats charades charades_sta_test.txt --out charades_sta.csv

- MSR-VTT 1k-A: the JSFusion test CSV (`key,vid_key,video_id,sentence`: 1,000 clips, one caption each),
  one row per clip. Or MSRVTT_data.json (`sentences: [{video_id, caption}]`) with --test-csv naming the
  JSFusion CSV: one row per 1k-A clip holding *all* its captions in a `captions` column (a JSON list;
  `caption` = the first), the 20-captions protocol: `vlpcache eval` then scores caption i against video
  i // q. Only the 1k-A test clips are
  kept. Path: VIDEO_ID.mp4.
- DiDeMo: the JSON list of moments (`video`, `description`, `times` in 5 s segment indices from 4
  annotators). Default: the paragraph protocol of Frozen-in-Time/DemoVLP (one row per video, its
  descriptions joined in time order, the whole video). --moments: one row per description with the
  window the annotators agree on most (start = 5 s * first segment, end = 5 s * (last segment + 1)).
- Charades-STA: lines `VIDEO START END##sentence`; one row per line, window [START, END]. Path: VIDEO.mp4.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from collections import Counter
from pathlib import Path


class FormatError(ValueError):
    """An annotation file does not look like the format asked for; the message names file and line."""


def _rows_out(rows: list[dict], out: Path) -> int:
    if not rows:
        raise FormatError(f"no rows to write to {out}: the input held no annotations")
    seen = Counter(r["video_id"] for r in rows)
    dupes = [v for v, n in seen.items() if n > 1]
    if dupes:
        raise FormatError(f"duplicate video ids {dupes[:5]}: every manifest row must have its own id")
    fields = ["video_id", "path", "caption"] + [k for k in ("captions", "start", "end") if k in rows[0]]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(out)
    return len(rows)


def _jsfusion(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = {"video_id", "sentence"} - set(reader.fieldnames or [])
        if missing:
            raise FormatError(f"{path}: MSR-VTT 1k-A CSV needs columns video_id,sentence; missing {sorted(missing)} "
                              f"(header: {reader.fieldnames})")
        return list(reader)


def msrvtt(path: Path, ext: str = ".mp4", test_csv: Path | None = None) -> list[dict]:
    if path.suffix != ".json":
        return [{"video_id": r["video_id"], "path": r["video_id"] + ext, "caption": r["sentence"].strip()}
                for r in _jsfusion(path)]
    if test_csv is None:
        raise FormatError(f"{path}: MSRVTT_data.json holds every split; pass --test-csv MSRVTT_JSFUSION_test.csv "
                          "to keep the 1k-A test clips only")
    data = json.loads(path.read_text())
    if "sentences" not in data:
        raise FormatError(f"{path}: MSRVTT_data.json must hold a 'sentences' list")
    per_video: dict[str, list[str]] = {}
    for s in data["sentences"]:
        per_video.setdefault(s["video_id"], []).append(" ".join(s["caption"].split()))
    test_ids = [r["video_id"] for r in _jsfusion(test_csv)]
    missing = [v for v in test_ids if v not in per_video]
    if missing:
        raise FormatError(f"{path}: no captions for 1k-A clips {missing[:5]} ({len(missing)} missing)")
    # every caption in the `captions` column (a JSON list, train.data.video_captions); `caption` = the first
    return [{"video_id": v, "path": v + ext, "caption": per_video[v][0], "captions": json.dumps(per_video[v])}
            for v in test_ids]


def _didemo_window(times: list[list[int]]) -> tuple[int, int]:
    """The segment span most annotators chose (ties: the earliest), as DiDeMo's evaluation does."""
    counts = Counter(tuple(t) for t in times)
    best = max(counts.items(), key=lambda kv: (kv[1], -kv[0][0], -kv[0][1]))[0]
    return best[0], best[1]


def didemo(path: Path, moments: bool = False) -> list[dict]:
    data = json.loads(path.read_text())
    if not isinstance(data, list) or not all({"video", "description", "times"} <= set(d) for d in data):
        raise FormatError(f"{path}: DiDeMo annotations must be a JSON list of objects with video, description, times")
    if moments:
        rows = []
        for k, d in enumerate(data):
            s, e = _didemo_window(d["times"])
            rows.append({"video_id": f"{Path(d['video']).stem}_m{k}", "path": d["video"],
                         "caption": d["description"].strip(), "start": f"{5.0 * s:g}", "end": f"{5.0 * (e + 1):g}"})
        return rows
    per_video: dict[str, list[tuple[tuple[int, int], str]]] = {}
    for d in data:
        per_video.setdefault(d["video"], []).append((_didemo_window(d["times"]), d["description"].strip()))
    return [{"video_id": Path(video).stem, "path": video,
             "caption": " ".join(text for _, text in sorted(items, key=lambda it: it[0]))}
            for video, items in per_video.items()]


def charades(path: Path, ext: str = ".mp4") -> list[dict]:
    rows = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        head, sep, sentence = line.partition("##")
        parts = head.split()
        if not sep or len(parts) != 3:
            raise FormatError(f"{path}:{lineno}: expected 'VIDEO START END##sentence', got {line[:80]!r}")
        vid, start, end = parts
        try:
            s, e = float(start), float(end)
        except ValueError as err:
            raise FormatError(f"{path}:{lineno}: start/end must be seconds, got {start!r} {end!r}") from err
        if e <= s:
            raise FormatError(f"{path}:{lineno}: end {e} is not after start {s}")
        rows.append({"video_id": f"{vid}_m{len(rows)}", "path": vid + ext, "caption": sentence.strip(),
                     "start": f"{s:g}", "end": f"{e:g}"})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.formats", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("format", choices=["msrvtt", "didemo", "charades"])
    p.add_argument("input", help="the benchmark's annotation file")
    p.add_argument("--out", required=True, help="generic manifest CSV to write")
    p.add_argument("--ext", default=".mp4", help="video file extension for MSR-VTT / Charades (default .mp4)")
    p.add_argument("--moments", action="store_true", help="DiDeMo: one row per moment (default: paragraphs)")
    p.add_argument("--test-csv", help="MSR-VTT with MSRVTT_data.json: the JSFusion 1k-A CSV naming the test clips")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    src = Path(args.input)
    if not src.is_file():
        print(f"train.formats: annotation file {src} not found", file=sys.stderr)
        return 2
    try:
        rows = {"msrvtt": lambda: msrvtt(src, args.ext, Path(args.test_csv) if args.test_csv else None), "didemo": lambda: didemo(src, args.moments),
                "charades": lambda: charades(src, args.ext)}[args.format]()
        n = _rows_out(rows, Path(args.out))
    except (FormatError, json.JSONDecodeError, KeyError) as e:
        print(f"train.formats: {e}", file=sys.stderr)
        return 2
    print(f"wrote {n} rows to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
