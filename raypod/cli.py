"""The ``raypod`` command line.

    raypod run CONFIG [--set key.path=value ...]   run a job (on RAY_ADDRESS or a local Ray)
    raypod check CONFIG [--set ...]                validate a config and print it resolved
    raypod bench startup                           launch-to-first-step against the anchors
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import yaml

from raypod.config import ConfigError, load_config


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="job config YAML (see jobs/configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a config key; the value is YAML (repeatable), "
                        "e.g. --set train.max_steps=200 --set 'fault.inject=[]'")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="raypod",
        description="Resilient PyTorch training on any Ray cluster: a driver keeps a sharded "
                    "job training through worker, node and hang failures and logs to one MLflow run.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log the driver's decisions")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p_run = sub.add_parser("run", help="run a job on the Ray cluster at RAY_ADDRESS, or on a local Ray",
                           description="Run a job to the end. Connects to RAY_ADDRESS when set, else "
                                       "starts a local Ray. Exit 0 on success, 1 when the job fails, "
                                       "2 for bad input.")
    _add_config_args(p_run)
    p_run.add_argument("--quiet", action="store_true", help="no progress line")
    p_check = sub.add_parser("check", help="validate a config and print it fully resolved",
                             description="Validate a config (keys, types, recipe import) without "
                                         "starting anything, and print the resolved YAML.")
    _add_config_args(p_check)
    p_bench = sub.add_parser("bench", help="run a benchmark suite side by side with its anchors",
                             description="Benchmarks print absolute figures and ratios against "
                                         "anchors run in the same invocation.")
    p_bench.add_argument("suite", choices=["startup", "recovery", "logging", "elastic"],
                         help="startup: launch to first step vs Ray Train V2 TorchTrainer and torchrun; "
                              "recovery: a worker killed after step 25 of the MLP workload, recovery gap "
                              "and steps replayed vs the same; logging: MLflow overhead vs logging off; "
                              "elastic: node-to-step seconds and shrink gap on Ray's fake autoscaler vs "
                              "Ray Train V2's elastic mode")
    p_bench.add_argument("--trials", type=int, default=3, help="trials per system")
    p_bench.add_argument("--out", default="benchmarks/results", help="where to write the table")
    return parser


def _run(args: argparse.Namespace) -> int:
    from raypod.api import JobFailed, run

    cfg = load_config(args.config, args.overrides)
    try:
        summary = run(cfg, progress=not args.quiet)
    except JobFailed as e:
        print(f"raypod: {e}", file=sys.stderr)
        return 1
    print(f"raypod | job {cfg.name} succeeded: step {summary['final_step']}, "
          f"{summary['failures']} failures recovered, goodput {summary['goodput']:.2f}, "
          f"summary {cfg.job_dir}/summary.json")
    from raypod.tracking.mlflow import resolve_tracking_uri

    if cfg.mlflow.enabled:
        uri = resolve_tracking_uri(cfg, cfg.job_dir)
        exe = Path(sys.executable).parent / "mlflow"
        mlflow_cmd = str(exe) if exe.exists() else "mlflow"
        print(f"raypod | MLflow run {summary.get('mlflow_run_id')} in {uri}\n"
              f"raypod | open it with: {mlflow_cmd} ui --backend-store-uri {uri} --port 5000  "
              f"(then http://127.0.0.1:5000)")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``raypod`` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("raypod").setLevel(logging.INFO if args.verbose else logging.WARNING)
    try:
        if args.command == "run":
            return _run(args)
        if args.command == "check":
            cfg = load_config(args.config, args.overrides)
            print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
            return 0
        if args.command == "bench":
            from raypod.bench import run_suite

            print(json.dumps(run_suite(args.suite, trials=args.trials, out=args.out), indent=2))
            return 0
    except ConfigError as e:
        print(f"raypod: error: {e}", file=sys.stderr)
        return 2
    return 2


if __name__ == "__main__":
    sys.exit(main())
