"""Pretrain the demo GPT: the same job as ``raypod run``, as a plain script.

    python jobs/pretrain_gpt.py --config jobs/configs/tiny.yaml [--set key.path=value ...]

This is what ``ray job submit -- python jobs/pretrain_gpt.py --config ...`` runs.
"""

import argparse
import sys

from raypod.cli import main

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="job config YAML")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    argv = ["run", args.config] + [f"--set={o}" for o in args.overrides] + (["--quiet"] if args.quiet else [])
    sys.exit(main(argv))
