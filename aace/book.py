"""Execute the book's notebooks with papermill and build the HTML with Jupyter Book 1.x."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = ROOT / "notebooks"
# In reading order; each becomes a page of the book.
NOTEBOOKS = ["intro", "aace_loss", "comparison", "convergence", "table2", "table3", "ablations", "claims", "label_noise", "performance",
             "own_training_loop"]


def execute_notebooks(profile: str, names: list[str] | None = None, parameters: dict | None = None,
                      runs_dir: str | None = None, output_dir: str | os.PathLike = "book") -> list[Path]:
    """Run each notebook with ``profile`` and the given parameters; returns the executed notebooks."""
    import papermill

    names = names or NOTEBOOKS
    unknown = [n for n in names if n not in NOTEBOOKS]
    if unknown:
        raise ValueError(f"notebook(s) {unknown} unknown; the book's notebooks are {NOTEBOOKS}")
    parameters = dict(parameters or {})
    declared = {n: papermill.inspect_notebook(str(NOTEBOOK_DIR / f"{n}.ipynb")) for n in names}
    for key in parameters:
        if not any(key in d for d in declared.values()):
            raise ValueError(f"parameter {key!r} is not a parameter of {names}; they take "
                             f"{sorted({p for d in declared.values() for p in d})}")
    if runs_dir:
        os.environ["AACE_RUNS"] = str(Path(runs_dir).resolve())
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    executed = []
    for name in names:
        own = {"profile": profile, **{k: v for k, v in parameters.items() if k in declared[name]}}
        target = output_dir / f"{name}.ipynb"
        print(f"executing {name} with {own}", flush=True)
        papermill.execute_notebook(str(NOTEBOOK_DIR / f"{name}.ipynb"), str(target), parameters=own,
                                   cwd=str(ROOT), kernel_name="python3", progress_bar=True)
        hide_parameter_cells(target)
        executed.append(target)
    return executed


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


def build_book(path: str | os.PathLike = ROOT) -> None:
    """``jupyter-book build PATH -W -n --keep-going``: warnings are errors."""
    jupyter_book = Path(sys.executable).parent / "jupyter-book"
    subprocess.run([str(jupyter_book), "build", str(path), "-W", "-n", "--keep-going"], check=True)
