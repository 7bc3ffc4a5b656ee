"""One run's configuration, its validation, and the named profiles."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, fields

from .data import AUGMENTS, DATASETS
from .losses import AACE_MODES, AACE_TARGETS, LOSSES, SMOOTHING_FORMS
from .models import VARIANTS, parse_model_name

METHODS = ("sgd", "sam", "aace")
MAX_THREADS = 1024  # beyond any machine's cores; torch's pool would fail to allocate a larger one
SCHEDULES = ("step", "cosine")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "bf16", "fp16")
# Losses either pass can use besides the method's own; AACE stays the 'aace' method's (its rho and mode).
OTHER_LOSSES = tuple(name for name in LOSSES if name != "aace")
# Settings that do not change the numbers a run produces: left out of the run's hash (``threads`` is a
# request; the thread count the run actually uses is hashed instead, see ``RunConfig.run_hash``).
NOT_IN_HASH = ("data_root", "download", "threads")


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines a training run. Invalid values raise ``ValueError`` on creation.

    ``rho`` and ``normalize`` default by method: SAM 0.05 normalised; AACE 0.2 unnormalised, the paper's
    step w - rho * grad L_AACE. ``method="aace"`` uses the AACE loss in the perturbation pass and
    ``update_loss`` cross-entropy (with ``label_smoothing``) in the update pass, as the authors' code.
    """
    dataset: str = "fashion_mnist"
    model: str = "wrn-10-1"
    model_variant: str = "standard"
    method: str = "sam"
    rho: float | None = None
    normalize: bool | None = None
    adaptive: bool = False
    aace_mode: str = "ada"
    aace_threshold: float = 0.0
    aace_target: str = "authors"
    label_smoothing: float = 0.0
    label_smoothing_form: str = "torch"    # or "authors": 1 - eps on the true class, eps / (K - 1) on the others
    perturbation_loss: str | None = None   # None: the method's own (CE for sam, AACE for aace)
    update_loss: str = "cross_entropy"
    focal_gamma: float = 2.0               # gamma of the focal and dual focal losses
    taylor_order: int = 2
    label_noise: float = 0.0               # symmetric: this share of training labels moved to another class
    imbalance_ratio: float = 1.0           # > 1: a long-tailed training subset, head over tail count (data.long_tail_counts)
    validation_label_noise: bool = False   # the validation split's labels too (as in practice); the test set stays clean
    epochs: int = 20
    batch_size: int = 128
    lr: float = 0.1
    lr_schedule: str = "step"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    augment: str = "paper"
    train_subset: int | None = None
    test_subset: int | None = None
    val_subset: int | None = None          # validation images held out of the training pool (see prepare_data)
    subset_seed: int | None = None         # None: the run's seed, so that each seed draws its own subsets
    eval_every: int = 1                    # test (and validation) accuracy every this many epochs, and at the last
    final_full_test: bool = False          # also score the last epoch on the whole test set (test_subset or not)
    seed: int = 42
    device: str = "auto"
    precision: str = "fp32"
    m_sharpness: bool = False
    threads: int | None = None
    data_root: str | None = None
    download: bool = False
    modified_data: bool = False            # train on a data set that is not the published one (its digest is hashed)

    def __post_init__(self):
        def fail(name, allowed):
            raise ValueError(f"RunConfig.{name}: expected {allowed}, got {getattr(self, name)!r}")

        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        def is_number(v):
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        choices = {"dataset": tuple(DATASETS), "model_variant": VARIANTS, "method": METHODS,
                   "aace_mode": AACE_MODES, "aace_target": AACE_TARGETS, "lr_schedule": SCHEDULES,
                   "augment": AUGMENTS, "device": DEVICES, "precision": PRECISIONS,
                   "label_smoothing_form": SMOOTHING_FORMS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                fail(name, f"one of {allowed}")
        if not isinstance(self.model, str):
            fail("model", "a model name such as 'wrn-10-1'")
        try:
            parse_model_name(self.model, self.model_variant)
        except ValueError as err:
            raise ValueError(f"RunConfig.model: {err}") from None
        for name in ("adaptive", "nesterov", "download", "m_sharpness", "final_full_test", "validation_label_noise",
                     "modified_data"):
            if not isinstance(getattr(self, name), bool):
                fail(name, "True or False")
        if self.normalize is not None and not isinstance(self.normalize, bool):
            fail("normalize", "True, False or None (None: True for sam, False for aace)")
        if self.rho is not None and not (is_number(self.rho) and self.rho >= 0):
            fail("rho", "a finite number >= 0, or None (None: 0.05 for sam, 0.2 for aace)")
        for name, low, high in (("aace_threshold", 0.0, 1.0), ("momentum", 0.0, 1.0)):
            v = getattr(self, name)
            if not (is_number(v) and low <= v <= high):
                fail(name, f"a number in [{low}, {high}]")
        if not (is_number(self.label_smoothing) and 0.0 <= self.label_smoothing < 1.0):
            fail("label_smoothing", "a number in [0, 1)")
        for name in ("lr", "weight_decay"):
            if not (is_number(getattr(self, name)) and getattr(self, name) >= 0):
                fail(name, "a finite number >= 0")
        for name in ("epochs", "batch_size", "eval_every"):
            if not (is_int(getattr(self, name)) and getattr(self, name) >= 1):
                fail(name, "an integer >= 1")
        for name in ("train_subset", "test_subset", "val_subset", "threads"):
            v = getattr(self, name)
            if v is not None and not (is_int(v) and v >= 1):
                fail(name, "None or an integer >= 1")
        if self.threads is not None and self.threads > MAX_THREADS:
            fail("threads", f"None or an integer in [1, {MAX_THREADS}] (CPU threads of one run)")
        classes = DATASETS[self.dataset].num_classes
        for name in ("train_subset", "test_subset", "val_subset"):
            v = getattr(self, name)
            if v is not None and v < classes:
                fail(name, f"None or at least the {classes} classes of {self.dataset} (a stratified subset "
                           f"needs one image of each)")
        # Below 2**32: the data order and the loss's random targets derive 64-bit generator seeds from it.
        if not (is_int(self.seed) and 0 <= self.seed < 2 ** 32):
            fail("seed", "an integer in [0, 2**32)")
        if self.subset_seed is not None and not (is_int(self.subset_seed) and 0 <= self.subset_seed < 2 ** 32):
            fail("subset_seed", "None (the run's seed) or an integer in [0, 2**32)")
        allowed_perturbation = {"sgd": (None,), "sam": (None, *OTHER_LOSSES), "aace": (None, "aace")}[self.method]
        if self.perturbation_loss not in allowed_perturbation:
            fail("perturbation_loss", f"one of {allowed_perturbation} for method {self.method!r}")
        if self.update_loss not in OTHER_LOSSES:
            fail("update_loss", f"one of {OTHER_LOSSES}")
        if not (is_number(self.focal_gamma) and self.focal_gamma >= 0):
            fail("focal_gamma", "a finite number >= 0")
        if not (is_int(self.taylor_order) and self.taylor_order >= 1):
            fail("taylor_order", "an integer >= 1")
        if not (is_number(self.label_noise) and 0.0 <= self.label_noise < 1.0):
            fail("label_noise", "a number in [0, 1)")
        if not (is_number(self.imbalance_ratio) and self.imbalance_ratio >= 1.0):
            fail("imbalance_ratio", "a finite number >= 1 (1: balanced classes)")
        if self.imbalance_ratio > 1 and (self.train_subset is None or self.train_subset % classes):
            fail("imbalance_ratio", f"1 unless train_subset is set to a multiple of the {classes} classes (the "
                                    f"balanced subset whose classes the long tail thins; train_subset is "
                                    f"{self.train_subset!r})")
        if self.validation_label_noise and not self.label_noise:
            fail("validation_label_noise", "False when label_noise is 0 (it noises the validation split at that rate)")
        if self.nesterov and self.momentum == 0:
            fail("nesterov", "False when momentum is 0 (Nesterov needs momentum)")
        if self.data_root is not None and not (isinstance(self.data_root, str) and self.data_root.strip()):
            fail("data_root", "None (the system copy) or the path of a folder")
        if self.modified_data and self.dataset != "fashion_mnist":
            fail("modified_data", "False for datasets other than fashion_mnist (torchvision checks their files)")
        # Resolve the method-dependent defaults so that the stored config says what ran.
        if self.method == "sgd":
            object.__setattr__(self, "rho", 0.0 if self.rho is None else self.rho)
            object.__setattr__(self, "normalize", True if self.normalize is None else self.normalize)
        else:
            default_rho, default_norm = (0.05, True) if self.method == "sam" else (0.2, False)
            object.__setattr__(self, "rho", default_rho if self.rho is None else float(self.rho))
            object.__setattr__(self, "normalize", default_norm if self.normalize is None else self.normalize)

    @property
    def data_seed(self) -> int:
        """The seed of the training, validation and test subsets: ``subset_seed``, or the run's seed."""
        return self.seed if self.subset_seed is None else self.subset_seed

    def class_counts(self) -> list[int] | None:
        """The training subset's images per class when it is long-tailed (``imbalance_ratio`` > 1), else None."""
        if self.imbalance_ratio == 1:
            return None
        from .data import long_tail_counts
        classes = DATASETS[self.dataset].num_classes
        return long_tail_counts(self.train_subset // classes, classes, self.imbalance_ratio)

    def loss_options(self, name: str) -> dict:
        """The options of a named loss that this config sets."""
        return {"focal": {"gamma": self.focal_gamma}, "dual_focal": {"gamma": self.focal_gamma},
                "taylor_ce": {"order": self.taylor_order}, "exp_weighted_ce": {"class_counts": self.class_counts()},
                "cross_entropy": {"label_smoothing": self.label_smoothing,
                                  "smoothing_form": self.label_smoothing_form}}.get(name, {})

    def replace(self, **changes) -> "RunConfig":
        unknown = set(changes) - {f.name for f in fields(self)}
        if unknown:
            raise ValueError(f"unknown RunConfig field(s) {sorted(unknown)}; fields are {field_names()}")
        if "method" in changes:  # method-dependent defaults follow the new method unless given
            changes.setdefault("rho", None)
            changes.setdefault("normalize", None)
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def run_hash(self, device_type: str, cpu_threads: int | None = None, version: str | None = None) -> str:
        """Short hash of every setting that changes the numbers, the device and the code's version.

        Settings at their default value are left out, so that adding an option to RunConfig later does
        not orphan the runs already stored (a changed default must come with a new ``aace.__version__``).
        On the CPU the thread count counts too: threads split the float sums differently, so 1 and 2
        threads give different numbers in the last bits (``threads`` itself is only a request).
        ``version``: the hash as another aace version computed it (to check an export made by that version).
        """
        from . import __version__
        defaults = {f.name: f.default for f in fields(self)}
        items = {k: v for k, v in self.to_dict().items() if k not in NOT_IN_HASH and v != defaults[k]}
        items["device"], items["aace_version"] = device_type, version or __version__
        if self.modified_data:  # another data set than the published one: its content names the run
            from .data import dataset_digest
            items["data_digest"] = dataset_digest(self.dataset, self.data_root)
        if device_type == "cpu":
            if not (isinstance(cpu_threads, int) and cpu_threads >= 1):
                raise ValueError(f"run_hash: a CPU run's hash needs its thread count, got cpu_threads={cpu_threads!r}")
            items["cpu_threads"] = cpu_threads
        return hashlib.sha256(json.dumps(items, sort_keys=True).encode()).hexdigest()[:10]

    def label(self) -> str:
        """Short human-readable description of the method, e.g. 'SAM+AACE (rho 0.2, unnormalised)'."""
        smoothing = f"label smoothing {self.label_smoothing:g}" if self.label_smoothing else ""
        if self.method == "sgd":
            return f"SGD ({smoothing})" if smoothing else "SGD"
        name = "SAM" if self.method == "sam" else "SAM+AACE"
        if self.method == "aace" and self.aace_mode != "ada":
            name += f"-{self.aace_mode}"
        if self.perturbation_loss not in (None, "cross_entropy", "aace"):
            name += f"[{self.perturbation_loss}]"
        norm = "" if self.normalize == (self.method == "sam") else (", normalised" if self.normalize else ", unnormalised")
        update = "" if self.update_loss == "cross_entropy" else f", update {self.update_loss}"
        return f"{name} (rho {self.rho:g}{norm}{update}{', ' + smoothing if smoothing else ''})"


def field_names() -> list[str]:
    return [f.name for f in fields(RunConfig)]


# The embedded default ('cpu'): Fashion-MNIST on WRN-10-1, a stratified 1,000-image training subset drawn per
# seed and a 1,000-image validation split beside it, no Cutout, a cosine schedule (the step schedule drops the
# rate too early for so few steps), 40 epochs: SAM fits its training set (30 epochs leave it at 92 %).
# One thread per run, so that runs are found again whatever the core count and the book trains one run per core;
# test and validation scored every 4th epoch (at 1 thread two 1,000-image evaluations cost a third of an epoch),
# the last epoch also on all 10,000 test images.
PROFILES: dict[str, dict] = {
    # The authors' settings (DESIGN.md section 2): a GPU job of days.
    "paper": dict(dataset="cifar100", model="wrn-28-10", model_variant="authors", epochs=200, batch_size=256,
                  lr=0.1, lr_schedule="step", momentum=0.9, weight_decay=5e-4, augment="paper", seed=42),
    "cpu": dict(dataset="fashion_mnist", model="wrn-10-1", epochs=40, batch_size=128, lr=0.1,
                lr_schedule="cosine", augment="no_cutout", train_subset=1000, val_subset=1000, test_subset=1000,
                eval_every=4, final_full_test=True, seed=0, threads=1),
    # The label-noise testbed (issue 23): the cpu profile with 40 % of the training and validation labels moved
    # to another class, uniformly (the test set stays clean). A pilot of 2 seeds (scripts/pilot_noise.py) gave SGD
    # 52.0 % and SAM (rho 0.2) 69.4 % final test accuracy: SAM's own effect, plainly visible.
    "cpu-noise": dict(dataset="fashion_mnist", model="wrn-10-1", epochs=40, batch_size=128, lr=0.1,
                      lr_schedule="cosine", augment="no_cutout", train_subset=1000, val_subset=1000, test_subset=1000,
                      eval_every=4, final_full_test=True, seed=0, threads=1, label_noise=0.4,
                      validation_label_noise=True),
    # The long-tailed testbed (issue 34): the cpu profile's settings on a training subset cut from a balanced 5,000
    # (500 a class) to the exponential profile at imbalance ratio 100 (500 images of class 0 down to 5 of class 9,
    # 1,236 in all; data.long_tail_counts); the 1,000-image validation split and the test set stay balanced.
    "cpu-imbalanced": dict(dataset="fashion_mnist", model="wrn-10-1", epochs=40, batch_size=128, lr=0.1,
                           lr_schedule="cosine", augment="no_cutout", train_subset=5000, val_subset=1000,
                           test_subset=1000, eval_every=4, final_full_test=True, seed=0, threads=1,
                           imbalance_ratio=100.0),
    # The long-tailed testbed's seconds-long copy (the nbval fixture's third study): 50 images a class cut to the
    # exponential profile at ratio 10 (50 down to 5 images, 199 in all), the smoke profile's schedule.
    "smoke-imbalanced": dict(dataset="fashion_mnist", model="wrn-10-1", epochs=3, batch_size=64, lr=0.1,
                             lr_schedule="cosine", augment="paper", train_subset=500, val_subset=128, test_subset=500,
                             seed=0, threads=1, imbalance_ratio=10.0),
    # The noise testbed's seconds-long copy (the nbval fixture's second study).
    "smoke-noise": dict(dataset="fashion_mnist", model="wrn-10-1", epochs=3, batch_size=64, lr=0.1,
                        lr_schedule="cosine", augment="paper", train_subset=256, val_subset=128, test_subset=256,
                        seed=0, threads=1, label_noise=0.4, validation_label_noise=True),
    # Full Fashion-MNIST on one GPU (see book/gpu_study): every training image but a stratified 10 % validation
    # split, the full test set, the authors' step schedule and augmentation, bfloat16 autocast. Model and epochs
    # were chosen from throughput measured on an H200 so that the whole study fits 20 minutes.
    "gpu": dict(dataset="fashion_mnist", model="wrn-16-4", epochs=10, batch_size=256, lr=0.1, lr_schedule="step",
                augment="paper", val_subset=6000, precision="bf16", seed=0),
    # One thread, so that a smoke run's hash is the same on any machine: the nbval pages find their runs in the
    # committed fixture store (tests/fixtures/runs) whatever the core count.
    "smoke": dict(dataset="fashion_mnist", model="wrn-10-1", epochs=3, batch_size=64, lr=0.1,
                  lr_schedule="cosine", augment="paper", train_subset=256, val_subset=128, test_subset=256, seed=0,
                  threads=1),
}


def profile_config(profile: str, **overrides) -> RunConfig:
    """A profile's RunConfig with any fields overridden."""
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {tuple(PROFILES)}, got {profile!r}")
    unknown = set(overrides) - set(field_names())
    if unknown:
        raise ValueError(f"unknown RunConfig field(s) {sorted(unknown)}; fields are {field_names()}")
    return RunConfig(**{**PROFILES[profile], **overrides})


@dataclass(frozen=True)
class Arm:
    """One column of a comparison: a name and the RunConfig fields that define it."""
    name: str
    settings: tuple  # ((field, value), ...), hashable

    @staticmethod
    def of(name: str, **settings) -> "Arm":
        return Arm(name, tuple(sorted(settings.items())))
