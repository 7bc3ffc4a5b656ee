"""Execute the book's notebooks with papermill and build the HTML with Jupyter Book 1.x."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from .paths import ROOT
from .progress import shown_while_running

NOTEBOOK_DIR = ROOT / "notebooks"
# In reading order; each becomes a page of the book.
NOTEBOOKS = ["intro", "replication", "aace_loss", "comparison", "noise", "imbalanced", "convergence", "table2", "table3",
             "ablations", "claims", "label_noise", "limitations", "performance", "own_training_loop", "build_report"]
REPORT = "build_report.json"  # beside the executed pages: what each page's last execution trained and read


class PageFailed(Exception):
    """A page's notebook stopped with an error; the page of the last good build is kept. ``exit_code``: 2 when
    the notebook refused a parameter (a ValueError in its first cells), else 1."""

    def __init__(self, name: str, ename: str, evalue: str):
        self.exit_code = 2 if ename in ("ValueError", "TypeError") else 1
        super().__init__(f"page {name}: {ename}: {evalue} (the page of the last good build is kept; --debug shows "
                         f"the notebook's traceback)")


def _kernels() -> list[int]:
    """This process's children: the notebook kernel papermill started (in a session of its own)."""
    from .pool import children_of
    return children_of(os.getpid())


@contextlib.contextmanager
def _interrupts_reach_the_kernel():
    """Ctrl-C (or SIGTERM) while a page executes is passed to its kernel as an interrupt, so that the cell stops
    the way a run expects (its runs recorded as interrupted) and papermill ends cleanly; it is repeated every
    few seconds while the page still runs, and the signal is raised once papermill has returned. A second
    Ctrl-C kills the kernel, so that papermill returns at once, and ends the same way."""
    got = {}

    def forward():
        while "signal" in got and not got.get("done"):
            for pid in _kernels():
                try:
                    os.killpg(pid, signal.SIGINT)
                except (ProcessLookupError, PermissionError):
                    pass
            if got["stop"].wait(10):
                return

    def handler(signum, frame):
        if "signal" in got:  # a second one: the kernel is killed, and papermill returns on its death at once,
            for pid in _kernels():  # never interrupted inside its event loop (that printed zmq's traceback)
                try:
                    os.killpg(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            return
        got["signal"], got["stop"] = signum, threading.Event()
        threading.Thread(target=forward, daemon=True).start()
    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield got
    finally:
        got["done"] = True
        if "stop" in got:
            got["stop"].set()
        for s, h in previous.items():
            signal.signal(s, h)


# Environment variables that change what a page reads: where the run store is, the runs frozen (read-only) there,
# and where the torchvision data sets are.
PAGE_ENVIRONMENT = ("AACE_RUNS", "AACE_FROZEN_RUNS", "AACE_DATA")


def _package_and_export_files() -> list[Path]:
    """Every file of the package (data files and subpackages included) and of every export a page may read."""
    roots = [ROOT / "aace", *sorted(ROOT.glob("results/*")), *sorted(ROOT.glob("tests/fixtures/study-*"))]
    return sorted(f for r in roots for f in r.rglob("*") if f.is_file() and "__pycache__" not in f.parts)


def page_inputs(name: str, parameters: dict) -> str:
    """A digest of what a page's executed output depends on, apart from the stored runs it read (``_store_digests``
    records those): its notebook, its parameters, every file of the package and of the committed exports, the
    environment variables that change what it reads (``PAGE_ENVIRONMENT``) and torch's version."""
    import hashlib
    import json

    import torch
    h = hashlib.sha256(json.dumps([name, parameters, {k: os.environ.get(k) for k in PAGE_ENVIRONMENT},
                                   torch.__version__], sort_keys=True, default=str).encode())
    for file in [NOTEBOOK_DIR / f"{name}.ipynb", *_package_and_export_files()]:
        h.update(str(file.relative_to(ROOT)).encode() + b"\0")
        h.update(hashlib.sha256(file.read_bytes()).digest() if file.is_file() else b"")
    return h.hexdigest()


STORED_RUN_FILES = ("summary.json", "metrics.csv", "config.json")


def _store_digests(paths) -> dict:
    """{run folder: SHA-256 of its result files} of the stored runs a page trained or read; None for a folder
    that is gone."""
    import hashlib
    out = {}
    for path in sorted(set(paths)):
        h, folder = hashlib.sha256(), Path(path)
        try:
            for name in STORED_RUN_FILES:
                h.update(name.encode() + b"\0" + ((folder / name).read_bytes() if (folder / name).is_file() else b""))
            out[str(folder)] = h.hexdigest()
        except OSError:
            out[str(folder)] = None
    return out


def _writable_folder(folder: Path, option: str) -> Path:
    """``folder``, created if need be, or a ValueError naming it and why it cannot take the pages."""
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{option} {folder}: is a file, not a folder; give a folder for the executed pages")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"{option} {folder}: cannot be created ({err.strerror or err}); give a folder you can "
                         f"write") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{option} {folder}: is not writable; give a folder you can write")
    return folder


def _kept(output_dir: Path, name: str, inputs: str) -> bool:
    """Whether the page's last good execution had these inputs and read the same stored runs (then it is kept,
    not executed again)."""
    entry = _read_report(output_dir).get(name)
    if not (isinstance(entry, dict) and entry.get("inputs") == inputs and (output_dir / f"{name}.ipynb").is_file()):
        return False
    store = entry.get("store_runs")
    return isinstance(store, dict) and _store_digests(store) == store


def _ipc_kernel_manager():
    """The kernel manager papermill starts a page's kernel with, its channels on Unix sockets (IPC) instead of TCP
    ports: a TCP port is picked free and bound by the kernel a moment later, and a kernel started at the same time
    elsewhere on the machine (a test's, another build's) can take it in between ("Address already in use")."""
    from jupyter_client.manager import AsyncKernelManager
    from traitlets import default

    class IPCKernelManager(AsyncKernelManager):
        @default("transport")
        def _default_transport(self):
            return "ipc"
    return IPCKernelManager


def execute_notebooks(profile: str, names: list[str] | None = None, parameters: dict | None = None,
                      runs_dir: str | None = None, output_dir: str | os.PathLike = "book",
                      rerun: bool = False) -> list[Path]:
    """Run each notebook with ``profile`` and the given parameters; returns the executed notebooks. Each page
    is executed beside its target and renamed into place only when it succeeded: a failed or interrupted page
    leaves the previous executed page as it was. A page whose inputs (``page_inputs``) are those of its last
    good execution is kept as it is, unless ``rerun``: a rebuild executes only what changed. The build report
    is always executed."""
    import papermill

    from .signals import Terminated
    names = names or NOTEBOOKS
    unknown = [n for n in names if n not in NOTEBOOKS]
    if unknown:
        raise ValueError(f"--notebook: {unknown} unknown; the book's notebooks are {NOTEBOOKS}")
    parameters = dict(parameters or {})
    if "profile" in parameters:
        raise ValueError(f"-p profile: the profile is --profile's (got -p profile {parameters['profile']!r}); use "
                         f"--profile {parameters['profile']}")
    declared = {n: papermill.inspect_notebook(str(NOTEBOOK_DIR / f"{n}.ipynb")) for n in names}
    for key in parameters:
        if not any(key in d for d in declared.values()):
            raise ValueError(f"-p {key}: not a parameter of {names}; they take "
                             f"{sorted({p for d in declared.values() for p in d})}")
    if runs_dir:
        os.environ["AACE_RUNS"] = str(Path(runs_dir).resolve())
    output_dir = _writable_folder(Path(output_dir), "--output-dir")
    executed = []
    for number, name in enumerate(names, 1):
        step = f"[{number}/{len(names)}]"
        own = {"profile": profile, **{k: v for k, v in parameters.items() if k in declared[name]}}
        if name == "build_report":
            own.setdefault("report", str((output_dir / REPORT).resolve()))
        target, partial = output_dir / f"{name}.ipynb", output_dir / f".{name}.executing.ipynb"
        inputs = page_inputs(name, own)
        if name != "build_report" and not rerun and _kept(output_dir, name, inputs):
            print(f"{step} keeping {name}: its notebook, parameters, package, exports and the stored runs it read are those of "
                  f"its last execution (--rerun executes it again)", flush=True)
            _mark_kept(output_dir, name)
            executed.append(target)
            continue
        shown = ", ".join(f"{k} {v}" for k, v in own.items() if k != "report")
        print(f"{step} executing {name} ({shown}); the runs it trains, if any, are listed below as they start and end",
              flush=True)
        log = output_dir / f".{name}.runs.log"
        log.unlink(missing_ok=True)
        os.environ["AACE_RUN_LOG"] = str(log.resolve())  # the kernel and its training children inherit it
        started = time.time()
        try:
            with shown_while_running(output_dir / f".{name}.progress"), _interrupts_reach_the_kernel() as got:
                try:
                    papermill.execute_notebook(str(NOTEBOOK_DIR / f"{name}.ipynb"), str(partial), parameters=own,
                                               cwd=str(ROOT), kernel_name="python3", progress_bar=False,
                                               kernel_manager_class=_ipc_kernel_manager(),
                                               # the kernel's own start-up log (its TCP warning) is not the reader's
                                               extra_arguments=["--IPKernelApp.log_level=ERROR"])
                except papermill.PapermillExecutionError as err:
                    if "signal" not in got:
                        raise PageFailed(name, err.ename, err.evalue) from err
                except Exception:  # a kernel killed by a second Ctrl-C: the signal is what ends the page
                    if "signal" not in got:
                        raise
            if "signal" in got:
                raise KeyboardInterrupt if got["signal"] == signal.SIGINT else Terminated()
            hide_parameter_cells(partial)
            os.replace(partial, target)
            record_page(output_dir, name, own, time.time() - started, log, inputs)
            entry = _read_report(output_dir)[name]
            print(f"{step} {name} done in {time.time() - started:.0f} s ({entry['runs_trained']} runs trained, "
                  f"{entry['runs_read_from_store'] + entry['runs_read_from_exports']} read)", flush=True)
        finally:
            partial.unlink(missing_ok=True)
            log.unlink(missing_ok=True)
            os.environ.pop("AACE_RUN_LOG", None)
        executed.append(target)
    return executed


def _read_report(output_dir: Path) -> dict:
    import json
    try:
        report = json.loads((output_dir / REPORT).read_text())
    except (OSError, ValueError):
        return {}
    return report if isinstance(report, dict) else {}


def _mark_kept(output_dir: Path, name: str) -> None:
    """A page kept from its last execution keeps that execution's entry, marked kept by this build."""
    report = _read_report(output_dir)
    report[name] = {**report[name], "kept": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    _write_report(output_dir / REPORT, report)


def record_page(output_dir: Path, name: str, parameters: dict, seconds: float, log: Path, inputs: str) -> None:
    """Add a page's entry to the build report: its time, the runs it trained and read (store, export), the
    machine, the version, the commit and its inputs' digest. Pages not executed this time keep their last entry."""
    from . import __version__
    from .results import git_commit, machine
    report = _read_report(output_dir)
    kinds = {}
    try:
        for line in log.read_text().splitlines():
            kind, _, path = line.partition("\t")
            kinds.setdefault(kind, set()).add(path)
    except OSError:
        pass
    trained = kinds.get("trained", set())
    stored = trained | kinds.get("store", set())
    import platform

    import torch
    report[name] = {"store_runs": _store_digests(stored), "seconds": seconds,
                    "runs": sorted(Path(p).name for p in stored | kinds.get("export", set())),
                    "python": platform.python_version(), "torch": torch.__version__, "parameters": parameters, "runs_trained": len(trained),
                    "runs_read_from_store": len(kinds.get("store", set()) - trained),
                    "runs_read_from_exports": len(kinds.get("export", set())),
                    "executed": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine(),
                    "aace_version": __version__, "git_commit": git_commit(), "inputs": inputs, "kept": None}
    _write_report(output_dir / REPORT, report)


def _write_report(report_file: Path, report: dict) -> None:
    import json

    from .store import _atomic_write_text
    _atomic_write_text(report_file, json.dumps(report, indent=2, sort_keys=True) + "\n")


def hide_parameter_cells(path: Path) -> None:
    """Tag the parameters cell and papermill's injected one 'remove-cell': the rendered page goes straight to
    its content; the notebook a reader reruns keeps them."""
    import nbformat
    nb = nbformat.read(str(path), as_version=4)
    for cell in nb.cells:
        tags = cell.metadata.get("tags", [])
        if ("parameters" in tags or "injected-parameters" in tags) and "remove-cell" not in tags:
            cell.metadata["tags"] = [*tags, "remove-cell"]
    nbformat.write(nb, str(path))


def repository_url(remote: str | None) -> str | None:
    """The web address of a git remote ('https://host/owner/repo'), from an https or scp-like ssh remote; None for
    a local path or nothing."""
    import re
    if not remote:
        return None
    remote = remote.strip()
    if remote.startswith(("https://", "http://")):
        return re.sub(r"\.git$", "", re.sub(r"//[^/@]+@", "//", remote))
    ssh = re.fullmatch(r"(?:ssh://)?git@([^:/]+)[:/](.+?)(?:\.git)?", remote)
    return f"https://{ssh.group(1)}/{ssh.group(2)}" if ssh else None


def _origin(path: Path) -> str | None:
    try:
        out = subprocess.run(["git", "remote", "get-url", "origin"], cwd=path, capture_output=True, text=True,
                             timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def build_book(path: str | os.PathLike = ROOT) -> None:
    """``jupyter-book build PATH -W -n --keep-going``: warnings are errors. The footer names the commit and the
    date of the build (a generated copy of _config.yml beside the build)."""
    import datetime

    import yaml

    from .results import git_commit
    path = Path(path)
    config = yaml.safe_load((path / "_config.yml").read_text())
    built = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    config.setdefault("html", {})["extra_footer"] = (f"<p>Built {built} from commit <code>{git_commit()[:12]}"
                                                     f"</code>; every number on these pages comes from that "
                                                     f"commit's code and exports.</p>")
    url = repository_url(_origin(path))
    if url:  # the reader's own clone's origin: a link only where the checkout has a web address to point to
        config["repository"] = {"url": url, "branch": "main"}
        config["html"]["use_repository_button"] = True
    generated = path / "_build" / "_config.generated.yml"
    generated.parent.mkdir(parents=True, exist_ok=True)
    generated.write_text(yaml.safe_dump(config, sort_keys=False))
    jupyter_book = Path(sys.executable).parent / "jupyter-book"
    subprocess.run([str(jupyter_book), "build", str(path), "--config", str(generated), "-W", "-n", "--keep-going"],
                   check=True)


def page_list() -> str:
    """The book's pages as the sidebar lists them (``_toc.yml``, by part), each with its title: the intro's page
    list, generated so that it never differs from the sidebar."""
    import yaml
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    lines = []
    for part in toc.get("parts", []):
        titles = []
        for chapter in part["chapters"]:
            stem = Path(chapter["file"]).name
            titles.append(f"{{doc}}`{stem}`" if (NOTEBOOK_DIR / f"{stem}.ipynb").is_file() or
                          (ROOT / "book" / f"{stem}.md").is_file() else stem)
        lines.append(f"- **{part['caption']}:** " + ", ".join(titles))
    return "\n".join(lines)
