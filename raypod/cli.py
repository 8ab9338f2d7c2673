"""The ``raypod`` command line.

    raypod run CONFIG [--set key.path=value ...]   run a job (on RAY_ADDRESS or a local Ray)
    raypod check CONFIG [--set ...]                validate a config and print it resolved
    raypod doctor [CONFIG] [--set ...]             health-check every node of the Ray cluster
    raypod bench startup                           launch-to-first-step against the anchors
    raypod bench goodput [--duration 600]          a rank killed every minute: goodput vs the anchors
    raypod chaos CONFIG [--faults 50 --seed 0]     seeded random faults, then a report of what was lost
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import yaml

from raypod import console
from raypod.config import ConfigError, load_config
from raypod.redact import install_log_redaction, redact_config, redact_text, redact_uri

BENCH_SUITES = ("startup", "recovery", "logging", "node_loss", "overhead", "checkpoint", "data", "elastic",
                "goodput", "gpu", "scale", "sim")
"""The names of :data:`raypod.bench.SUITES`, spelled here so that the parser does not import the
benchmarks (a unit test holds the two equal)."""
RESULTS = "benchmarks/results"


_ABOUT_RUN = """Run a job to the end. Connects to RAY_ADDRESS when set, else starts a local Ray. Exit 0
on success, 1 when the job fails, 2 for bad input (also when another driver runs the same job), 143 when
stopped by SIGTERM (ray job stop), 130 by SIGINT (Ctrl-C); a stop ends the job cleanly as 'stopped'."""
_ABOUT_CHECK = """Validate a config (keys, types, the recipe builds) without starting anything, and print
the resolved YAML."""
_ABOUT_DOCTOR = """On every alive node of the Ray cluster at RAY_ADDRESS (else a local one): torch
imports, devices are visible, the config's checkpoint storage is writable, and an all-reduce across the
nodes measures bandwidth. Prints a table; exit 0 when every check passes, 1 naming the failing check
otherwise. The same checks run before every job (doctor.enabled)."""
_ABOUT_BENCH = """Benchmarks print absolute figures and ratios against anchors run in the same
invocation."""
_ABOUT_CHAOS = """Run CONFIG with --faults seeded random faults of every kind fault.inject supports
(MLflow on), then the same job without faults, and report faults injected and recovered, the final state
digest against the fault-free run, samples duplicated and skipped, MLflow points missing, the restore
source of each recovery and the survivor processes lost. Exit 0 when nothing was lost."""
"""What ``raypod <command> --help`` says (argparse folds the lines)."""


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="job config YAML (see jobs/configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a config key; the value is YAML (repeatable), "
                        "e.g. --set train.max_steps=200 --set 'fault.inject=[]'")


def _add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run a job on the Ray cluster at RAY_ADDRESS, or on a local Ray",
                       description=_ABOUT_RUN)
    _add_config_args(p)
    p.add_argument("--quiet", action="store_true", help="no progress line")


def _add_check(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("check", help="validate a config and print it fully resolved",
                       description=_ABOUT_CHECK)
    _add_config_args(p)


def _add_doctor(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("doctor", help="health-check every node: torch, devices, storage, all-reduce",
                       description=_ABOUT_DOCTOR)
    p.add_argument("config", nargs="?", default=None,
                   help="job config YAML whose storage and devices to check (default: the defaults)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a config key (repeatable)")
    p.add_argument("--json", action="store_true", help="print the reports as JSON after the table")


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="run a benchmark suite side by side with its anchors",
                       description=_ABOUT_BENCH)
    p.add_argument("suite", choices=list(BENCH_SUITES),
                   help="startup: launch to first step vs Ray Train V2 TorchTrainer and torchrun; "
                        "recovery: a worker killed or frozen (SIGSTOP) after step 25 of the MLP workload, "
                        "recovery gap, steps replayed and (raypod) detection vs the same; logging: MLflow overhead vs logging off; "
                        "node_loss: a whole node of a multi-node cluster removed, in-place recovery "
                        "gap; overhead: steady-state step time vs torchrun and a plain loop; "
                        "checkpoint: the stall of an in-memory snapshot and of a persistent save "
                        "vs Ray Train V2's report with a checkpoint; data: the Ray Data stream's "
                        "samples/s vs training's and data_wait_frac; elastic: node-to-step seconds "
                        "and shrink gap on Ray's fake autoscaler vs Ray Train V2's elastic mode; "
                        "goodput: a 10-minute run with a rank SIGKILLed every 60 s, the share of "
                        "time kept training vs the same; gpu: one GPU, tokens/s and MFU vs a plain PyTorch loop; "
                        "scale: light ranks at 2..32 ranks, raypod's step time vs the ranks with no "
                        "driver, driver CPU per step, kill gap, and the simulator's calibration; "
                        "sim: the real driver against 1,000-100,000 simulated ranks in virtual time, costed "
                        "by the scale suite's calibration")
    p.add_argument("--trials", type=int, default=None, help="trials per system (default: the suite's, "
                                                            "3 for most; goodput runs once)")
    p.add_argument("--duration", type=float, default=None,
                   help="goodput: seconds per system (default 600)")
    p.add_argument("--kill-every", type=float, default=None,
                   help="goodput: seconds between kills (default 60)")
    p.add_argument("--faults", default=None,
                   help="recovery: comma-separated faults, kill and/or freeze (default kill,freeze)")
    p.add_argument("--systems", default=None,
                   help="recovery, goodput: comma-separated systems to run (default all: raypod, ray_train_v2, "
                        "torchrun, ray_train_torchft, torchft)")
    p.add_argument("--ranks", default=None,
                   help="scale: comma-separated rank counts, run in order (default 2,4,8,16,32); "
                        "sim: the same (default 1000,10000,100000)")
    p.add_argument("--steps", type=int, default=None, help="scale: steps per run (default 40); sim: steps "
                                                           "per simulation (default 24, 9, 6 by size)")
    p.add_argument("--calibration", default=None,
                   help="sim: the folder of scale_calibration.json (default: --out)")
    p.add_argument("--step-s", type=float, default=None,
                   help="sim: a rank's step time in seconds (default 5.93: Llama 3 405B at 16K GPUs)")
    p.add_argument("--cluster", choices=("cold", "running"), default=None,
                   help="startup: 'cold' (default) launches each trial with its own local Ray; 'running' "
                        "starts one Ray head (token auth on) and submits each trial with `ray job submit`")
    p.add_argument("--out", default=RESULTS, help="where to write the table")


def _add_chaos(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chaos", help="a long run with seeded random faults, then a report",
                       description=_ABOUT_CHAOS)
    _add_config_args(p)
    p.add_argument("--faults", type=int, default=50, help="faults to inject")
    p.add_argument("--seed", type=int, default=0, help="seeds where, on which rank, which kind")
    p.add_argument("--spacing", type=int, default=4, help="fewest steps between two faults")
    p.add_argument("--steps", type=int, default=None,
                   help="train.max_steps (default: the config's, raised to fit the faults)")
    p.add_argument("--storage", default=None, help="checkpoint.storage (default: a temporary folder)")
    p.add_argument("--out", default=RESULTS, help="where to write chaos.json/.md ('-': nowhere)")
    p.add_argument("--progress", action="store_true", help="print the jobs' progress lines")
    p.add_argument("--nodes", type=int, default=2,
                   help="raylets of the local Ray cluster both jobs run on, ranks spread over them, so that "
                        "a freeze_node stops one node's ranks (default 2; 1: no cluster, Ray as 'raypod run')")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="raypod",
        description="Resilient PyTorch training on any Ray cluster: a driver keeps a sharded "
                    "job training through worker, node and hang failures and logs to one MLflow run.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log the driver's decisions")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_run, _add_check, _add_doctor, _add_bench, _add_chaos):
        add(sub)
    return parser


def _exit_now(code: int) -> None:
    """End the process after a stop, skipping the interpreter's teardown and exit handlers.

    ``ray job stop`` SIGKILLs the driver ``RAY_JOB_STOP_WAIT_TIME_S`` (3) seconds after its
    SIGTERM; Ray's own exit handler takes most of a second on a busy machine and the final
    garbage collection over torch, Ray and MLflow objects seconds more. Everything the job
    owns is written by now (summary, MLflow run, lease); the cluster notices the driver is
    gone as it would after a crash, and its actors are already stopped.
    """
    import logging

    out = console.get()
    if out is not None:  # driver.log complete (a remote job folder gets it now)
        out.end_status()
        out.close_log()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _run(args: argparse.Namespace) -> int:
    from raypod.api import JobFailed, JobStopped, run

    cfg = load_config(args.config, args.overrides)
    try:
        summary = run(cfg, progress=not args.quiet)
    except JobStopped as e:  # a user's stop is not a failure: 128 + signal (143 SIGTERM, 130 SIGINT)
        print(f"raypod | {redact_text(str(e))}", flush=True)
        _exit_now(e.exit_code)
    except JobFailed as e:
        print(f"raypod: {redact_text(str(e))}", file=sys.stderr)
        return 1
    print(f"raypod | job {cfg.name} succeeded: step {summary['final_step']}, "
          f"{summary['failures']} failures recovered, goodput {summary['goodput']:.2f}, "
          f"summary {redact_uri(cfg.job_dir)}/summary.json")
    from raypod.tracking.mlflow import resolve_tracking_uri

    if cfg.mlflow.enabled:
        uri = redact_uri(resolve_tracking_uri(cfg, cfg.job_dir))
        exe = Path(sys.executable).parent / "mlflow"
        mlflow_cmd = str(exe) if exe.exists() else "mlflow"
        page = summary.get("mlflow_url") or "http://127.0.0.1:5000"
        if uri.startswith(("http://", "https://")):
            print(f"raypod | MLflow run {summary.get('mlflow_run_id')}: {page}")
        else:
            print(f"raypod | MLflow run {summary.get('mlflow_run_id')} in {uri}\n"
                  f"raypod | open it with: {mlflow_cmd} ui --backend-store-uri {uri} --port 5000  "
                  f"(then {page})")
    return 0


def _doctor(args: argparse.Namespace) -> int:
    from raypod.api import connect_ray
    from raypod.doctor import failing_nodes, print_table, run_doctor

    cfg = load_config(args.config, args.overrides)
    connect_ray(cfg)
    # Without a config (or a --set checkpoint.storage) there is no storage of the user's to check.
    storage_given = args.config is not None or any(o.strip().startswith("checkpoint.storage")
                                                   for o in args.overrides)
    reports = run_doctor(cfg, check_storage=storage_given)
    print_table(reports)
    if args.json:
        print(json.dumps(reports, indent=2))
    bad = failing_nodes(reports)
    for node, why in bad.items():
        print(f"raypod doctor: node {node} fails check {why}", file=sys.stderr)
    return 1 if bad else 0


def _check(args: argparse.Namespace) -> int:
    from raypod.recipe import build_recipe, check_sharding

    cfg = load_config(args.config, args.overrides)
    check_sharding(cfg, build_recipe(cfg))  # a constructor that raises is refused here too, as by run
    print(yaml.safe_dump(redact_config(cfg), sort_keys=False))
    return 0


def _bench(args: argparse.Namespace) -> int:
    from raypod.bench import run_suite

    extra = {k: v for k, v in (("duration", args.duration), ("kill_every", args.kill_every)) if v is not None}
    if extra and args.suite != "goodput":
        print(f"raypod: error: --duration and --kill-every are for the goodput suite, "
              f"not '{args.suite}'", file=sys.stderr)
        return 2
    if args.faults is not None:
        if args.suite != "recovery":
            print(f"raypod: error: --faults is for the recovery suite, not '{args.suite}'", file=sys.stderr)
            return 2
        unknown = sorted(set(args.faults.split(",")) - {"kill", "freeze"})
        if unknown:
            print(f"raypod: error: --faults takes kill and/or freeze, not {', '.join(unknown)}", file=sys.stderr)
            return 2
        extra["faults"] = args.faults
    if args.systems is not None:
        if args.suite not in ("recovery", "goodput"):
            print(f"raypod: error: --systems is for the recovery and goodput suites, not '{args.suite}'",
                  file=sys.stderr)
            return 2
        extra["systems"] = args.systems
    scale = {k: v for k, v in (("ranks", args.ranks), ("steps", args.steps)) if v is not None}
    if scale and args.suite not in ("scale", "sim"):
        print(f"raypod: error: --ranks and --steps are for the scale and sim suites, not '{args.suite}'",
              file=sys.stderr)
        return 2
    extra.update(scale)
    sim = {k: v for k, v in (("calibration_dir", args.calibration), ("step_s", args.step_s)) if v is not None}
    if sim and args.suite != "sim":
        print(f"raypod: error: --calibration and --step-s are for the sim suite, not '{args.suite}'", file=sys.stderr)
        return 2
    extra.update(sim)
    if args.cluster is not None:
        if args.suite != "startup":
            print(f"raypod: error: --cluster is for the startup suite, not '{args.suite}'", file=sys.stderr)
            return 2
        extra["cluster"] = args.cluster
    print(json.dumps(run_suite(args.suite, trials=args.trials, out=args.out, **extra), indent=2))
    return 0


def _chaos(args: argparse.Namespace) -> int:
    from raypod.bench.chaos import run_chaos

    report = run_chaos(args.config, faults=args.faults, seed=args.seed, spacing=args.spacing,
                       steps=args.steps, overrides=args.overrides, storage=args.storage,
                       out=None if args.out == "-" else args.out, progress=args.progress, nodes=args.nodes)
    return 0 if report["nothing_lost"] else 1


_COMMANDS = {"run": _run, "check": _check, "doctor": _doctor, "bench": _bench, "chaos": _chaos}
"""Sub-command -> its handler (``args`` in, exit code out)."""


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``raypod`` console script."""
    args = build_parser().parse_args(argv)
    install_log_redaction()  # no credentials in any log line or warning, MLflow's and Ray's included
    # raypod's lines on the console, Ray's and MLflow's detail in <job_dir>/driver.log
    console.install(verbose=args.verbose)
    try:
        return _COMMANDS[args.command](args)
    except ConfigError as e:
        print(f"raypod: error: {redact_text(str(e))}", file=sys.stderr)
        return 2
    finally:
        console.uninstall()  # only once Ray is gone: until then it may forward worker lines


if __name__ == "__main__":
    sys.exit(main())
