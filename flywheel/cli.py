"""The ``flywheel`` command: ``run``, ``sweep``, ``serve`` and ``report``.

    flywheel run [key=value ...] [--run-dir DIR]           a new run (progress lines, a per-lap table at the end)
    flywheel run --resume DIR [key=value ...] [--force]    continue a run after its last finished stage
    flywheel sweep [key=value ...] --grid k=v1,v2 [--grid ...] --seeds N|S1,S2 [--ablations] [--run-dir DIR]
    flywheel sweep --spec configs/sweep/fidelity.yaml [key=value ...]
    flywheel serve [--port P --task T ...] [key=value ...]  a standalone simulator server (services.server)
    flywheel report DIR                                    rebuild the report of a run or a sweep
    flywheel config show [key=value ...]                   the resolved config, each value with its layer

A bad override exits with status 2 and a message naming the key and what is allowed, before
anything (run directory, tracking store, Ray) starts.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
import threading
from pathlib import Path

from flywheel.config import ConfigError, load_config


def _say(message: str) -> None:
    print(message, flush=True)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flywheel", description="Physics-feedback RL self-play flywheel.")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the laps (or resume a run)")
    run.add_argument("overrides", nargs="*", help="config overrides, e.g. task=cartpole simulator.fidelity=0.5")
    run.add_argument("--run-dir", help="run directory (default: <runs_root>/<time>-<task>-f<fidelity>-s<seed>)")
    run.add_argument("--resume", metavar="RUN_DIR", help="continue this run after its last finished stage")
    run.add_argument("--force", action="store_true", help="resume even if the config changed")
    sweep = sub.add_parser("sweep", help="a grid of settings x seeds under one parent MLflow run")
    sweep.add_argument("overrides", nargs="*")
    sweep.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                       help="an axis of the grid (repeatable), e.g. simulator.fidelity=0,0.5,1")
    sweep.add_argument("--seeds", default="1", help="seeds per setting: a count N (seed, seed+1, ...) or a list "
                       "1000,2000 (default 1)")
    sweep.add_argument("--run-dir", help="sweep directory (an existing one is continued)")
    sweep.add_argument("--ablations", action="store_true", help="beside each setting: the same laps without "
                       "world-model retraining, and PPO trained directly in reality")
    sweep.add_argument("--spec", help="a YAML with overrides, grid and seeds (e.g. configs/sweep/fidelity.yaml)")
    serve = sub.add_parser("serve", help="a standalone simulator server", add_help=False)
    serve.add_argument("args", nargs=argparse.REMAINDER)
    report = sub.add_parser("report", help="rebuild the report of a finished run or sweep")
    report.add_argument("run_dir")
    config = sub.add_parser("config", help="inspect the configuration").add_subparsers(dest="action", required=True)
    show = config.add_parser("show", help="the resolved config, each value with the layer it came from")
    show.add_argument("overrides", nargs="*", help="config overrides, as for run")
    return p


def _parse(argv: list[str]) -> argparse.Namespace:
    """The command line; overrides may come before or after the options (``--run-dir DIR task=cartpole``)."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    args.argv = list(argv)
    if extra and hasattr(args, "overrides") and not any(e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["serve"]:
        return _serve(argv[1:])
    args = _parse(argv)
    if args.command == "config":                  # prints the config; starts nothing
        return _config_show(args)
    try:
        return _command(args)
    except ConfigError as exc:
        print(f"flywheel: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        return _stopped(args, getattr(exc, "signum", signal.SIGINT))
    except SystemExit as exc:   # Ray's own handler, back after the first signal, exits with the bare signal number
        if exc.code in (signal.SIGINT, signal.SIGTERM):
            return _stopped(args, exc.code)
        raise
    except Exception as exc:  # noqa: BLE001 - one readable line; the run keeps the traceback (error.txt, MLflow)
        from flywheel.orchestrator import one_line

        print(f"flywheel: error: {one_line(exc)}", file=sys.stderr)
        return 1
    finally:
        _shutdown_ray()


def _stopped(args, signum: int) -> int:
    """Say how the run was stopped (and how to go on with it); the exit status is 128 + the signal's number."""
    sweep_dir = getattr(args, "sweep_dir_used", None)
    if sweep_dir:
        again = [a for a in args.argv if a != args.run_dir] if args.run_dir else list(args.argv)
        again = [a for a in again if a != "--run-dir" and not a.startswith("--run-dir=")]
        print(f"flywheel: stopped by {signal.Signals(signum).name}; the sweep's MLflow run (and the child it was running) "
              f"is marked KILLED; continue it with: flywheel {shlex.join(again)} --run-dir {sweep_dir}", file=sys.stderr)
        return 128 + int(signum)
    run_dir = getattr(args, "run_dir_used", None)
    where = f"; continue it with: flywheel run --resume {run_dir}" if run_dir else ""
    marked = "the run is marked KILLED" if run_dir and (Path(run_dir) / "tracking.json").exists() else \
        "no MLflow run was made yet"
    print(f"flywheel: stopped by {signal.Signals(signum).name}; {marked}{where}", file=sys.stderr)
    return 128 + int(signum)


def _command(args) -> int:
    if args.command == "run":
        return _run(args)
    if args.command == "sweep":
        from flywheel.sweep import load_spec, parse_grid, run_sweep

        overrides, grid, seeds = list(args.overrides), parse_grid(args.grid) if args.grid else {}, args.seeds
        ablations = args.ablations
        if args.spec:
            spec_overrides, spec_grid, spec_seeds, spec_ablations = load_spec(args.spec)
            overrides, grid = [*spec_overrides, *overrides], {**spec_grid, **grid}
            seeds = args.seeds if args.seeds != "1" else spec_seeds
            ablations = ablations or spec_ablations
        run_sweep(overrides, grid or parse_grid([]), seeds, args.run_dir, say=_say, ablations=ablations,
                  opened=lambda sweep_dir: setattr(args, "sweep_dir_used", str(sweep_dir)))
        return 0
    return _report(Path(args.run_dir))


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _serve(argv: list[str]) -> int:
    """``flywheel serve``: the server's config from the same layers as ``flywheel run``; bad input exits 2, one line."""
    p = _OneLineParser(prog="flywheel serve", description="Serve the corrected simulator over gRPC. Overrides as for "
                       "`flywheel run`: task, seed, engine.*, rewards.*, simulator.horizon and service.* (e.g. "
                       "service.max_sessions=8 service.token_file=/run/secrets/token rewards.weights.physics=0.5).")
    p.add_argument("overrides", nargs="*", help="config overrides, key=value")
    flags = {"--host": "service.host", "--port": "service.port", "--task": "task", "--engine": "engine.name",
             "--world-model-dir": "service.world_model_dir"}
    for flag, key in flags.items():
        p.add_argument(flag, help=f"the same as {key}=...")
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                   help="simulator physics parameter, the same as engine.params.NAME=VALUE (repeatable)")
    p.add_argument("--world-model", help="world-model checkpoint to serve (default: an untrained model)")
    p.add_argument("--trajectory-dir", help="record served trajectories here (default: record nothing)")
    args = p.parse_intermixed_args(argv)
    given = {key: getattr(args, flag[2:].replace("-", "_")) for flag, key in flags.items()}
    # a flag's value is a string as typed (YAML would read [::1] as a list); the port stays a number
    overrides = [f"{key}={value if key == 'service.port' else json.dumps(value)}" for key, value in given.items()
                 if value is not None]
    for item in args.param:
        if "=" not in item:
            p.error(f"--param expects NAME=VALUE, got {item!r}")
        overrides.append(f"engine.params.{item}")
    per_run = {"world_model_path": args.world_model, "trajectory_dir": args.trajectory_dir}
    try:
        from flywheel.config import load_service_config

        config = load_service_config([*overrides, *args.overrides], **{k: v for k, v in per_run.items() if v})
    except ConfigError as exc:
        print(f"flywheel serve: error: {exc}", file=sys.stderr)
        return 2
    from services.server import run_server

    return run_server(config, prog="flywheel serve")


def _run(args) -> int:
    from flywheel.orchestrator import Orchestrator, one_line

    if args.resume:
        if args.run_dir:
            raise ConfigError(f"--run-dir names a new run's directory; --resume {args.resume} is the run directory "
                              "to continue (give one of them)")
        orch = Orchestrator.resume(args.resume, args.overrides, force=args.force, say=_say)
    else:
        if args.force:
            raise ConfigError("--force only applies with --resume RUN_DIR")
        orch = Orchestrator.create(load_config(args.overrides), args.run_dir, say=_say)
    args.run_dir_used = str(orch.run_dir)
    try:
        orch.run()
    except Exception as exc:
        if not orch.failure_recorded:                   # failed before the run could record it (opening MLflow)
            raise
        where = f"traceback: {orch.error_file}; " if orch.error_file else "traceback: MLflow's error/traceback.txt; "
        raise RuntimeError(f"{one_line(exc)} ({where}mlflow run {orch.tracker.run_id if orch.tracker else '-'}, "
                           "tag flywheel.error)") from exc
    return 0


def _config_show(args) -> int:
    """Print the resolved config as ``key: value  # origin`` lines; a bad override exits 2 with one line."""
    from flywheel.config import format_config, load_config_with_origins

    try:
        cfg, composed = load_config_with_origins(args.overrides)
    except ConfigError as exc:
        print(f"flywheel: error: {exc}", file=sys.stderr)
        return 2
    _say(format_config(cfg, composed))
    return 0


def _report(run_dir: Path) -> int:
    from flywheel.report import format_table, load_history, write_run_report
    from flywheel.sweep_report import write_sweep_report

    if (run_dir / "sweep.json").exists():
        files = write_sweep_report(run_dir, say=_say)
    elif (run_dir / "state.json").exists():
        files = write_run_report(run_dir)
        _say(format_table(load_history(run_dir)))
    else:
        what = "does not exist" if not run_dir.exists() else "is neither a flywheel run nor a sweep directory"
        raise ConfigError(f"{run_dir} {what} (a run directory holds state.json, a sweep directory sweep.json)")
    for f in files:
        _say(f"wrote {f}")
    return 0


def _shutdown_ray() -> None:
    """``ray.shutdown``; a signal meanwhile (a second Ctrl-C) exits with 128 + its number, not Ray's bare number."""
    if "ray" not in sys.modules:
        return
    import ray

    if not ray.is_initialized():
        return
    main_thread = threading.current_thread() is threading.main_thread()
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)} if main_thread else {}
    try:
        for sig in saved:
            signal.signal(sig, lambda signum, frame: sys.exit(128 + signum))
        ray.shutdown()
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    raise SystemExit(main())
