"""``python -m tcd_sampler.assets``: check the shipped files against their manifest (the default), or write the
manifest again with ``--write-manifest`` after retraining the shipped models (``make digits-models`` does)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import tcd_sampler.assets as shipped

from . import MANIFEST_NAME, shipped_files, verify, write_manifest


def main(argv: Sequence[str] | None = None) -> int:
    """Returns 0 when the files match (or the manifest was written), 2 with one line on stderr otherwise."""
    parser = argparse.ArgumentParser(prog="python -m tcd_sampler.assets", description=__doc__)
    parser.add_argument(
        "--write-manifest", action="store_true", help=f"write {MANIFEST_NAME} from the files now shipped"
    )
    args = parser.parse_args(argv)
    try:
        if args.write_manifest:
            path = write_manifest()
            print(f"wrote {path} ({len(shipped_files())} files)")
        else:
            verify(shipped.ROOT)  # read now: tests point it at a copy
            print(f"{len(shipped_files())} shipped files match {shipped.ROOT / MANIFEST_NAME}")
    except (OSError, ValueError) as err:
        print(f"tcd_sampler.assets: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
