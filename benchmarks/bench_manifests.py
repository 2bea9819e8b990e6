"""Stage 1 rerun: validating every pair again against reusing the validation memo, in one run.

    python benchmarks/bench_manifests.py --scenes 64 --repeats 3

Writes the demo data set (``--scenes`` per group, 6 groups) into a temporary folder and times
``build_manifest_tables`` there: once with ``validate_candidate`` on every pair (what every
stage 1 rerun did before the memo, the baseline) and as a rerun through ``ValidationMemo`` with
every pair unchanged. Both give the same tables (checked).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.timing import best_of  # noqa: E402
from modules.data.demo_dataset import write_demo_dataset  # noqa: E402
from modules.data.manifest import build_manifest_tables  # noqa: E402
from modules.data.sample_files import DataRoots  # noqa: E402
from modules.data.validation_memo import ValidationMemo  # noqa: E402

THRESHOLD, MIN_SIDE, SEED, FRACTIONS = 127, 32, 123, (0.8, 0.1, 0.1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=64, help="demo scenes per group (6 groups)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each (the best counts)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_manifests_") as scratch:
        images, masks = Path(scratch) / "images", Path(scratch) / "masks"
        write_demo_dataset(images, masks, args.scenes, 2026)
        memo_file = Path(scratch) / "memo.json"

        def tables(memo: ValidationMemo | None = None):
            return build_manifest_tables("split_roots", images, masks, THRESHOLD, MIN_SIDE, SEED, FRACTIONS, None,
                                         progress=False, validate=memo.validate if memo else None)

        def with_memo():
            memo = ValidationMemo(memo_file, DataRoots(images, masks), THRESHOLD, MIN_SIDE, reuse=True)
            result = tables(memo)
            memo.save()
            return result, memo.reused

        (valid, invalid), _ = with_memo()  # writes the memo
        (rerun_valid, rerun_invalid), reused = with_memo()
        full_valid, full_invalid = tables()
        if not (rerun_valid.equals(full_valid) and rerun_invalid.equals(full_invalid) and valid.equals(full_valid)):
            sys.exit("the memo's tables differ from a full validation")
        every_pair = best_of(args.repeats, tables)
        memo_rerun = best_of(args.repeats, with_memo)
    pairs = len(full_valid) + len(full_invalid)
    print(f"{pairs} pairs ({len(full_valid)} valid), memo reused {reused}; {os.cpu_count()} CPU cores ({platform.machine()})")
    print(f"stage 1 tables, every pair validated: {every_pair:.3f} s")
    print(f"stage 1 tables, rerun with the memo:  {memo_rerun:.3f} s ({memo_rerun / every_pair:.3f}x)")


if __name__ == "__main__":
    main()
