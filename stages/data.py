"""Data stage: read one dataset (torchvision download, or the mirror in $PROVAE_DATA_MIRROR),
verify it, and write the prepared arrays plus a provenance record."""

from __future__ import annotations

import argparse
import os
import sys

from common import write_json

from provae.data import MIRROR_ENV, DataError, prepare, save_prepared


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--out", required=True, help="prepared .npz")
    parser.add_argument("--provenance", required=True, help="provenance .json")
    parser.add_argument("--download-root", required=True, help="torchvision's download folder")
    args = parser.parse_args()

    mirror = os.environ.get(MIRROR_ENV) or None
    try:
        data = prepare(args.dataset, mirror, args.download_root)
    except (DataError, ValueError) as error:
        sys.exit(f"data stage failed for {args.dataset}: {error}")
    save_prepared(data, args.out)
    write_json(args.provenance, data.provenance)
    print(f"{data.provenance['label']}: {data.provenance['counts']} from {data.provenance['source']}")


if __name__ == "__main__":
    main()
