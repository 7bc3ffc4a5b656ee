"""How the book writes values in prose: seed lists, data set and augmentation names, booleans, settings.
Never a raw Python repr in a sentence."""
from __future__ import annotations

DATASET_NAMES = {"fashion_mnist": "Fashion-MNIST", "cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "food101": "Food101"}
AUGMENT_NAMES = {"paper": "the paper's augmentation (with Cutout)", "no_cutout": "the paper's augmentation without Cutout",
                 "none": "no augmentation"}


def seeds(values) -> str:
    """'0–49', '0, 1 and 5', '100–102': runs of consecutive seeds as ranges."""
    values = sorted(set(int(v) for v in values))
    if not values:
        return "none"
    parts, start = [], values[0]
    for prev, cur in zip(values, values[1:] + [None]):
        if cur != prev + 1:
            parts += [f"{start}"] if start == prev else [f"{start}", f"{prev}"] if prev == start + 1 else [f"{start}–{prev}"]
            start = cur
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def dataset(name: str) -> str:
    return DATASET_NAMES.get(name, name)


def augment(name: str) -> str:
    return AUGMENT_NAMES.get(name, name)


def yes_no(value: bool) -> str:
    return "yes" if value else "no"


def values(items) -> str:
    """Numbers as a reader writes them: '0.05, 0.1 and 0.2'."""
    shown = [f"{v:g}" if isinstance(v, float) else str(v) for v in items]
    return shown[0] if len(shown) == 1 else ", ".join(shown[:-1]) + " and " + shown[-1] if shown else "none"


def count(n: int, word: str, plural: str | None = None) -> str:
    """'1 seed', '3 seeds', '1 run'."""
    return f"{n} {word if n == 1 else plural or word + 's'}"


def settings(items: dict) -> str:
    """RunConfig fields as prose: 'epochs 2, validation split none'."""
    return ", ".join(f"{k.replace('_subset', ' split').replace('_', ' ')} {'none' if v is None else v}"
                     for k, v in (items or {}).items())
