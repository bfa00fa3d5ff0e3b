"""`vlpcache status OUT [--json]` and `vlpcache verify OUT [--json]` (dispatched by pipeline/cli.py)."""
from __future__ import annotations

import argparse
import json
import sys

from stores.errors import StoreError
from stores.reader import open_store


def status_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vlpcache status", description="Count ok / failed / pending videos of a "
                                     "store and list each failed video's id and error.")
    parser.add_argument("out", metavar="OUT", help="the store folder (the --out of extract)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = parser.parse_args(argv)
    try:
        with open_store(args.out) as reader:
            status = reader.status
            info = reader.store_meta
    except StoreError as e:
        print(f"vlpcache status: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({**status.to_json(), "backend": info.backend, "n_videos": info.n_videos}, indent=1))
        return 0
    print(f"{args.out}: {info.backend} store of {info.n_videos} videos; shards committed {status.shards_committed}/{status.shards_total}")
    print(f"ok {status.ok}  failed {status.failed}  pending {status.pending}")
    for video_id, error in status.failures:
        print(f"  failed {video_id}: {error}")
    return 0


def verify_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vlpcache verify", description="Re-read every shard of a store and check "
                                     "ledgers, file checksums, every chunk and the counts. Exit 0: complete and intact; "
                                     "1: corrupt (each bad shard is named); 2: intact but shards are pending.")
    parser.add_argument("out", metavar="OUT", help="the store folder (the --out of extract)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = parser.parse_args(argv)
    from stores.verify import verify_store  # here: it loads h5py, which `status` does not need

    report = verify_store(args.out)
    if args.json:
        print(json.dumps(report.to_json(), indent=1))
        return report.exit_code
    if report.store_error:
        print(f"BAD store {args.out}: {report.store_error}")
    for shard, problems in sorted(report.bad.items()):
        for problem in problems:
            print(f"BAD shard {shard}: {problem}")
    for shard, why in sorted(report.incomplete.items()):
        print(f"INCOMPLETE shard {shard}: {why}")
    if report.pending:
        print(f"pending shards ({len(report.pending)}): {report.pending[:20]}{' ...' if len(report.pending) > 20 else ''}")
    for step in report.fix:
        print(f"fix: {step}")
    verdict = {0: "OK", 1: "CORRUPT", 2: "INCOMPLETE"}[report.exit_code]
    print(f"{verdict}: {len(report.good)} shards intact ({report.videos_checked} videos checked), {len(report.bad)} bad, "
          f"{len(report.incomplete)} incomplete, {len(report.pending)} pending")
    return report.exit_code
