"""The one `vlpcache` command. Each subcommand lives in its own module with `main(argv) -> int`;
modules are imported only when their subcommand runs, so `train`/`eval` load torch models lazily."""
from __future__ import annotations

import importlib
import logging
import sys

# subcommand -> (module with main(argv) -> int, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "extract": ("pipeline.extract", "extract frame and region features from a manifest into a store"),
    "status": ("stores.cli", "count ok / failed / pending videos of a store"),
    "verify": ("stores.cli", "re-read every shard and check checksums and counts"),
    "migrate": ("pipeline.migrate", "convert a format-1 store to format 2 in place"),
    "show": ("pipeline.show", "draw a video's sampled frames, boxes and word-region attention"),
    "demo-data": ("pipeline.demo", "write the synthetic demo corpus (mp4 + manifest + boxes)"),
    "finetune-detector": ("pipeline.finetune", "fine-tune a torchvision detector on the demo corpus's boxes"),
    "train": ("train.cli", "pre-train a video-text model from cached features"),
    "eval": ("train.cli", "evaluate retrieval and moment retrieval"),
}


def usage() -> str:
    lines = ["usage: vlpcache COMMAND [--help] ...", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"vlpcache: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    module = importlib.import_module(COMMANDS[command][0])
    entry = getattr(module, f"{command.replace('-', '_')}_main", None) or module.main
    return int(entry(rest) or 0)
