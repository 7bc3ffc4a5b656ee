"""Command line: ``python -m aace train | study | runs | book``."""
from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import os
import shlex
import sys
from pathlib import Path

from . import signals, store
from .config import PROFILES, RunConfig, field_names, profile_config
from .study import PLANS


EXIT_HELP = """exit codes: 0 done; 1 the run diverged; 2 bad option or setting; 3 dataset missing or damaged;
4 run store damaged or not found; 5 cannot write (disk full, permissions); 6 study stopped at --stop-after;
7 a Slurm job failed, was cancelled or timed out, or the runs waited past --slurm-pending-limit;
130 interrupted (SIGINT); 143 terminated (SIGTERM). Interrupted runs resume with the same command."""


def _parse_value(text: str, annotation: str):
    """Turn a command-line string into the field's type; usage errors name the field."""
    lowered = text.lower()
    if "None" in annotation and lowered in ("none", "null"):
        return None
    if annotation.startswith("bool"):
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    for kind in (int, float):
        if annotation.startswith(kind.__name__):
            try:
                return kind(text)
            except ValueError:
                raise argparse.ArgumentTypeError(
                    f"expected {'an integer' if kind is int else 'a number'}"
                    f"{' or none' if 'None' in annotation else ''}, got {text!r}") from None
    return text


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    hints = {f.name: str(f.type) for f in dataclasses.fields(RunConfig)}
    group = parser.add_argument_group("run settings (override the profile; see aace.config.RunConfig)")
    for name in field_names():
        group.add_argument(f"--{name.replace('_', '-')}", dest=name, default=argparse.SUPPRESS, metavar="VALUE",
                           type=lambda text, n=name: _parse_value(text, hints[n]))


def _config_from_args(args: argparse.Namespace) -> RunConfig:
    overrides = {name: getattr(args, name) for name in field_names() if hasattr(args, name)}
    return profile_config(args.profile, **overrides)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m aace", description=__doc__, epilog=EXIT_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show the traceback of every error (or AACE_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train one run (or show its stored result)")
    train.add_argument("--profile", default="cpu", choices=tuple(PROFILES))
    train.add_argument("--runs-dir", default=None, help="run store (default: $AACE_RUNS or ./runs)")
    train.add_argument("--restart", action="store_true", help="discard this config's stored run and train anew")
    train.add_argument("--no-progress", action="store_true")
    _add_config_options(train)

    study = sub.add_parser("study", help="the tuned comparison: rho grid on a validation split, then fresh seeds")
    study.add_argument("--profile", default="gpu", choices=tuple(PLANS), help="the study: a profile's plan (cpu-reference: the clean reference study, on the cpu profile)")
    study.add_argument("--runs-dir", default=None)
    study.add_argument("--workers", type=int, default=None, help="runs at once (processes sharing the device; "
                       "default 1; local executor only)")
    study.add_argument("--stop-after", type=float, default=None, metavar="MINUTES",
                       help="start no new run after this many minutes (the study resumes when run again)")
    study.add_argument("--export", default=None, metavar="DIR", help="when complete, export the study to DIR")
    study.add_argument("--resume-from", action="append", default=[], metavar="DIR",
                       help="also take finished runs from this export (another study's, say), checked first; repeatable")
    study.add_argument("--print-commands", action="store_true",
                       help="print one 'python -m aace train' command per run (for a job array) instead")
    study.add_argument("--executor", choices=("local", "slurm"), default="local",
                       help="local: a pool of processes on this machine (--workers); slurm: each phase as one Slurm "
                            "job array, submitted from this (login) node, the run store on a shared filesystem")
    cluster = study.add_argument_group("Slurm (with --executor slurm)")
    for name, kind, meta, what in SLURM_OPTIONS:
        cluster.add_argument(f"--slurm-{name}", type=kind, default=None, metavar=meta, help=what)
    _add_config_options(study)

    runs = sub.add_parser("runs", help="list stored runs with their final numbers")
    runs.add_argument("--runs-dir", default=None)

    book = sub.add_parser("book", help="execute the notebooks with papermill and build the book")
    book.add_argument("--profile", default="cpu", choices=tuple(PROFILES))
    book.add_argument("--notebook", action="append", default=None,
                      help="only this notebook (name without .ipynb); repeatable")
    book.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "JSON"),
                      help="set a notebook parameter, its value as JSON, e.g. -p seeds '[0, 1]'")
    book.add_argument("--runs-dir", default=None)
    book.add_argument("--no-build", action="store_true", help="execute the notebooks only")
    book.add_argument("--output-dir", default="book", help="where the executed notebooks go")
    book.add_argument("--rerun", action="store_true",
                      help="execute every page, also those whose inputs are unchanged since their last execution")

    args = parser.parse_args(argv)
    debug = args.debug or os.environ.get("AACE_DEBUG", "") not in ("", "0")
    try:
        with signals.sigterm_raises():
            if args.command == "train":
                return _train(args)
            if args.command == "study":
                return _study(args, argv)
            if args.command == "runs":
                return _runs(args)
            return _book(args, parser)
    except (Exception, KeyboardInterrupt, signals.Terminated) as err:
        code = exit_code(err)
        if code is None or debug:
            raise  # unexpected: the traceback is the report
        message = " ".join(str(err).split()) if not isinstance(err, OSError) or not err.strerror else \
            " ".join(err.strerror.split())
        if isinstance(err, (KeyboardInterrupt, signals.Terminated)):
            message = f"interrupted by {'SIGINT' if isinstance(err, KeyboardInterrupt) else 'SIGTERM'}"
        print(f"error: {message}", file=sys.stderr)
        return code


# --slurm-NAME: (name, type, metavar, help); aace.slurm.SlurmOptions holds them (its defaults).
SLURM_OPTIONS = (("partition", str, "NAME", "the partition (default: the cluster's)"),
                 ("gpus-per-run", int, "N", "GPUs of each run (default 0)"),
                 ("cpus-per-run", int, "N", "CPUs of each run, its thread count on the CPU (default 1)"),
                 ("time", int, "MINUTES", "each run's time limit (default 60)"),
                 ("max-parallel", int, "N", "runs at once, at most (default 64)"),
                 ("pending-limit", float, "MINUTES", "end the study when its runs have waited this long with none "
                                                     "running (default 60)"),
                 ("log-dir", str, "DIR", "the jobs' logs (default: <runs-dir>/slurm)"),
                 ("config", str, "FILE", "a JSON object of further submitit SlurmExecutor parameters (account, "
                                         "qos, mem, constraint, setup, ...)"))


def _slurm_options(args):
    """The study's ``SlurmOptions``, or None for the local pool; --slurm-* without --executor slurm is refused."""
    given = {name: getattr(args, f"slurm_{name.replace('-', '_')}") for name, *_ in SLURM_OPTIONS}
    given = {name: value for name, value in given.items() if value is not None}
    if args.executor != "slurm":
        if given:
            raise ValueError(f"--slurm-{next(iter(given))}: only with --executor slurm")
        return None
    if args.workers is not None:
        raise ValueError("--workers: the local pool's; with --executor slurm, --slurm-max-parallel caps the runs at once")
    import shutil
    if shutil.which("sbatch") is None or shutil.which("squeue") is None:
        raise ValueError("--executor slurm: no sbatch or squeue on this machine's PATH; run the study on the "
                         "cluster's login node, or use --executor local")
    from .slurm import SlurmOptions
    names = {"time": "time_minutes", "pending-limit": "pending_limit_minutes"}
    options = {names.get(n, n.replace("-", "_")): v for n, v in given.items() if n != "config"}
    return SlurmOptions.from_file(given["config"], **options) if "config" in given else SlurmOptions(**options)


# Exit codes of expected failures (documented in the README); anything else shows its traceback.
EXIT_CODES = {"diverged": 1, "usage": 2, "data": 3, "store": 4, "write": 5, "incomplete": 6,
              "SIGINT": 130, "SIGTERM": 143}


def exit_code(err: BaseException) -> int | None:
    from .data import DatasetCorrupt, DatasetNotFound
    from .book import PageFailed
    from .pool import RunFailed
    if isinstance(err, (store.RunInterrupted, RunFailed, PageFailed)):
        return err.exit_code
    if isinstance(err, KeyboardInterrupt):
        return EXIT_CODES["SIGINT"]
    if isinstance(err, signals.Terminated):
        return EXIT_CODES["SIGTERM"]
    if isinstance(err, (DatasetNotFound, DatasetCorrupt)):
        return EXIT_CODES["data"]
    if isinstance(err, (store.CorruptRun, store.MissingRun, store.StoreNotFound)):
        return EXIT_CODES["store"]
    if isinstance(err, store.StoreWriteError) or (isinstance(err, OSError) and err.errno in (
            errno.ENOSPC, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EEXIST)):
        return EXIT_CODES["write"]
    if isinstance(err, ValueError):
        return EXIT_CODES["usage"]
    return None


def _train(args) -> int:
    from .train import run
    config = _config_from_args(args)
    result = run(config, args.runs_dir, progress=not args.no_progress, restart=args.restart)
    how = "trained" if result.trained else "read from the store"
    print(f"{result.path} ({how}): {json.dumps(result.summary, sort_keys=True)}")
    return 0 if result.status == "finished" else 1


def _study(args, argv) -> int:
    from . import pool, study
    overrides = {name: getattr(args, name) for name in field_names() if hasattr(args, name)}
    study.check_overrides(overrides)
    study.check_stop_after(args.stop_after)
    plan = study.plan_for(args.profile)
    if args.export is not None and not args.export.strip():
        raise ValueError(f"--export: expected the path of a folder, got {args.export!r}")
    if args.print_commands and (args.export or args.resume_from):
        raise ValueError(f"--{'export' if args.export else 'resume-from'}: has no effect with --print-commands, which "
                         f"prints the runs' commands and trains nothing; leave one of them out")
    if args.print_commands:
        configs = study.tuning_configs(plan, **overrides) + study.final_configs(plan, None, **overrides)
        for config in configs:
            print(pool.train_command(config, plan.profile, args.runs_dir))
        if not _tuning_done(study, plan, args, overrides):
            again = ["python", "-m", "aace", "study", "--profile", args.profile,
                     *(["--runs-dir", args.runs_dir] if args.runs_dir else []), "--print-commands"]
            print(f"# then: {shlex.join(again)} again, once these have finished, prints the final runs at the "
                  f"chosen rhos")
        return 0
    slurm = _slurm_options(args)
    if args.workers is None:
        args.workers = 1
    if args.workers < 1:
        raise ValueError(f"--workers: expected an integer >= 1, got {args.workers}")
    from . import reference
    from .results import _check_target, export, runs_in_export
    finders, earlier = [], []
    if args.export:  # before any training: a study of hours must not end on an unusable --export
        _check_target(Path(args.export).absolute(), {"profile": args.profile, "plan": study._plan_record(plan)})
    for directory in [*([args.export] if args.export else []), *args.resume_from]:
        if directory in args.resume_from and not Path(directory).is_dir():
            raise ValueError(f"--resume-from {directory!r}: expected the folder of an export")
        finder, history = runs_in_export(directory, reference.pinned_digest(directory), args.runs_dir,
                                         check_store=True)
        if finder is None and directory in args.resume_from:
            raise ValueError(f"--resume-from {directory}: holds no export (no study.json)")
        if finder is not None:
            finders.append(finder)
            earlier += history

    def found(config):
        for finder in finders:
            run_ = finder(config)
            if run_ is not None:
                return run_
        return None
    stop_after = None if args.stop_after is None else 60 * args.stop_after
    record = study.run_study(args.profile, args.runs_dir, args.workers, stop_after, found=found if finders else None,
                             earlier_invocations=earlier, slurm=slurm, **overrides)
    exported = ""
    if args.export:
        command = "python -m aace " + shlex.join(argv if argv is not None else sys.argv[1:])
        exported = f"{export(record, args.export, command)}"
        print(f"exported {len(record['runs'])} runs{'' if record['complete'] else ' (a partial export)'} to {exported}")
    if record["complete"]:
        return 0
    print(f"error: study {args.profile} stopped at --stop-after {args.stop_after:g} minutes before it was complete "
          f"({len(record['runs'])} runs stored{', exported to ' + exported if exported else ''}): run the same "
          f"command again to go on", file=sys.stderr)
    return EXIT_CODES["incomplete"]


def _tuning_done(study, plan, args, overrides) -> bool:
    """Prints the final runs' commands when the store already holds the finished tuning runs."""
    from . import pool
    from .store import load_run, run_dir
    from .train import resolve_device
    runs = []
    for config in study.tuning_configs(plan, **overrides):
        found = load_run(run_dir(config, resolve_device(config.device), args.runs_dir), missing_ok=True)
        if found is None or found.status not in ("finished", "diverged"):
            return False
        runs.append(found)
    chosen = {k: v["rho"] for k, v in study.choose_rhos(plan, runs).items()}
    for config in study.final_configs(plan, chosen, **overrides):
        if config.method != "sgd":
            print(pool.train_command(config, plan.profile, args.runs_dir))
    return True


def _runs(args) -> int:
    problems = []
    rows = store.list_runs(args.runs_dir, problems)
    if not rows and not problems:
        print("no runs stored")
        return 0

    def number(value, scale, digits):
        return f"{scale * value:.{digits}f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"
    print(f"{'run':<18} {'status':<11} {'method':<36} {'dataset':<14} {'model':<12} {'seed':>4} {'epochs':>6} "
          f"{'train acc':>9} {'test acc':>8} {'minutes':>7}")
    for r in rows:
        s = r.summary
        print(f"{r.path.name:<18} {store.shown_status(r):<11} {r.config.label():<36} {r.config.dataset:<14} "
              f"{r.config.model:<12} {r.config.seed:>4} {r.config.epochs:>6} {number(s.get('train_acc'), 100, 2):>9} "
              f"{number(s.get('test_acc'), 100, 2):>8} {number(s.get('wall_seconds'), 1 / 60, 1):>7}")
    for folder, reason in problems:
        print(f"{folder.name:<18} {'unreadable':<11} {reason}")
    return 0


def _book(args, parser) -> int:
    from .book import build_book, execute_notebooks
    parameters = {}
    for name, value in args.parameter:
        try:
            parameters[name] = json.loads(value)
        except json.JSONDecodeError as err:
            if value.strip()[:1] in ("[", "{", '"') or value.strip()[:1].isdigit():  # meant as JSON
                raise ValueError(f"-p {name}: {value!r} is not valid JSON ({err}); give a JSON value, e.g. "
                                 f"-p seeds '[0, 1]', or a bare word for a string") from None
            parameters[name] = value  # a bare string, e.g. -p dataset cifar10
    execute_notebooks(args.profile, args.notebook, parameters, args.runs_dir, args.output_dir, args.rerun)
    if not args.no_build:
        build_book()
    return 0


if __name__ == "__main__":
    sys.exit(main())
