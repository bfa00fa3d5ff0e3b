"""`vlpcache migrate OUT [--allow-pending]`: convert a format-1 store to format 2 in place (stores/migrate.py),
holding OUT's job lock so that no extract writes into it meanwhile."""
from __future__ import annotations

import argparse
import sys

from stores.errors import StoreError
from stores.ledger import Layout, load_store_meta


def main(argv: list[str] | None = None) -> int:
    """Exit 0 when OUT is format 2 afterwards (also when it already was), 1 on error."""
    parser = argparse.ArgumentParser(
        prog="vlpcache migrate",
        description="Convert a format-1 store to format 2 in place (docs/store-format.md, 'Migrating a format-1 "
                    "store'). Feature data is not re-encoded: Zarr chunk files are kept as they are, HDF5 shard files "
                    "are copied once to their format-2 names. Safe to kill at any moment: OUT is a complete store of "
                    "one format or the other throughout, and rerunning finishes the job. A format-2 store written "
                    "before buffer sidecars gets them (its Arrow files are not touched); otherwise it is left as is (exit 0). Exit 1: not a store, pending shards, or damaged files (each "
                    "named; `vlpcache verify OUT` lists them all).")
    parser.add_argument("out", metavar="OUT", help="the store folder (the --out of extract)")
    parser.add_argument("--allow-pending", action="store_true",
                        help="also migrate a store whose format-1 extraction stopped before every shard was committed "
                             "(make sure none runs); this vlpcache's `extract` then extracts the pending shards")
    args = parser.parse_args(argv)
    from pipeline.lock import LockHeld, OutLock
    from stores.migrate import migrate_store

    try:
        load_store_meta(Layout(args.out))  # before the lock: the lock would create a missing OUT
        with OutLock(args.out):
            result = migrate_store(args.out, allow_pending=args.allow_pending)
    except (StoreError, LockHeld) as e:
        print(f"vlpcache migrate: {e}", file=sys.stderr)
        return 1
    if result.action == "already":
        print(f"{result.out} is already a format-2 store: nothing to do")
    elif result.action == "sidecars":
        print(f"{result.out} is a format-2 store: added buffer sidecars for {result.shards} Arrow file(s), so that its "
              f"readers need no pyarrow")
    elif result.action == "finished":
        print(f"{result.out}: finished a killed migration (removed the format-1 files); it is a format-2 store")
    else:
        print(f"{result.out}: migrated {result.shards} shards to format 2"
              f"{f' ({result.resumed} already done by a killed run)' if result.resumed else ''}; "
              f"`vlpcache verify {result.out}` checks every file")
    return 0
