"""Where the repository is: the folder holding the package, the notebooks, the exports and the book."""
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
