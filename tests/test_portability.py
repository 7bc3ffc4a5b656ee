"""What keeps the suite independent of the machine: the smoke profile's hashes, the frozen fixture store
that nbval reads, the thread count a run leaves behind."""
import json
from pathlib import Path

import pytest
import torch

import aace
from aace import gpu_scale, results
from aace.config import RunConfig, profile_config
from aace.store import MissingRun, load_run, run_dir
from aace.train import run

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def test_smoke_runs_have_one_folder_whatever_the_thread_count():
    config = profile_config("smoke", method="aace")
    before = torch.get_num_threads()
    try:
        folders = set()
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            folders.add(run_dir(config, torch.device("cpu"), "store"))
        assert len(folders) == 1
        # the cpu profile keeps the machine's thread count in its hash: 1 and 2 threads differ in the last bits
        cpu = profile_config("cpu")
        assert cpu.run_hash("cpu", 1) != cpu.run_hash("cpu", 2)
    finally:
        torch.set_num_threads(before)


def test_a_run_leaves_the_thread_count_as_it_found_it(tmp_path):
    before = torch.get_num_threads()
    run(profile_config("smoke", epochs=1, train_subset=64, test_subset=32, threads=1), tmp_path, progress=False)
    assert torch.get_num_threads() == before


def test_a_frozen_store_refuses_to_train(tmp_path, monkeypatch):
    monkeypatch.setenv("AACE_FROZEN_RUNS", str(tmp_path))
    with pytest.raises(MissingRun, match="make nbval-fixture"):
        run(profile_config("smoke", epochs=1, train_subset=64, test_subset=32), tmp_path, progress=False)
    assert not list(tmp_path.glob("*/metrics.csv"))


@pytest.mark.skipif(not (FIXTURES / "runs").is_dir(), reason="no fixture store")
def test_fixture_store_is_current():
    """Every fixture run still hashes to its folder with this aace version: a change that alters the numbers
    (and bumps aace.__version__) makes this fail until `make nbval-fixture` has been rerun."""
    folders = sorted(p for p in (FIXTURES / "runs").iterdir() if p.is_dir())
    assert folders
    assert not [p.name for p in (FIXTURES / "runs").iterdir() if p.is_file()]  # no study history: nothing trains
    for folder in folders:
        r = load_run(folder)
        assert r.finished, folder.name
        assert r.config.threads == 1 and r.info["environment"]["threads"] == 1
        assert folder.name == f"{r.config.method}-{r.config.run_hash('cpu', 1)}", \
            f"{folder.name} is stale (aace {aace.__version__}): rerun make nbval-fixture"
    readable = [f for f in folders if (f / "checkpoint.pt").exists()]
    # only the checkpoints the sharpness analysis reads are kept (2 seeds of the smoke study's 4 arms)
    assert 0 < len(readable) <= 8


@pytest.mark.skipif(not (FIXTURES / "study-smoke").is_dir(), reason="no fixture export")
def test_fixture_export_passes_its_integrity_check_and_the_book_section_reads_it():
    assert results.check_export(FIXTURES / "study-smoke") == []
    text, tables = gpu_scale.gpu_scale_section("smoke")
    assert text.startswith("**Setting:**") and "Reproduce with `python -m aace study --profile smoke" in text
    arms, comparisons = tables
    assert list(comparisons.index) == ["SAM − SGD", "SAM+AACE − SAM", "SAM+AACE, normalised step − SAM"]
    assert "MDE (80 % power)" in comparisons.columns
    meta = json.loads((FIXTURES / "study-smoke" / "study.json").read_text())
    assert len(arms) == 1 + len(meta["chosen"])


def test_book_section_says_plainly_when_no_export_exists(monkeypatch, tmp_path):
    monkeypatch.setitem(gpu_scale.EXPORTS, "cpu", str(tmp_path / "nothing-here"))
    text, tables = gpu_scale.gpu_scale_section("cpu")
    assert text.startswith("**No GPU-scale results yet:**") and "python -m aace study --profile gpu" in text
    assert tables == []


def test_config_without_val_subset_keeps_its_hash():
    """Adding val_subset (default None) must not orphan the runs stored before it existed."""
    assert RunConfig(method="sam").run_hash("cuda") == RunConfig(method="sam", val_subset=None).run_hash("cuda")
    assert RunConfig(method="sam").run_hash("cuda") != RunConfig(method="sam", val_subset=100).run_hash("cuda")
    # nor validation_label_noise (default False): the runs of aace 0.4.0 keep their hashes
    noisy = RunConfig(method="sam", label_noise=0.4)
    assert noisy.run_hash("cuda") == RunConfig(method="sam", label_noise=0.4, validation_label_noise=False).run_hash("cuda")
    assert noisy.run_hash("cuda") != RunConfig(method="sam", label_noise=0.4, validation_label_noise=True).run_hash("cuda")


def test_hash_at_another_version_is_what_that_version_computed(monkeypatch):
    config = RunConfig(method="aace", rho=0.1)
    at_current = config.run_hash("cuda")
    monkeypatch.setattr(aace, "__version__", "9.9.9")
    assert config.run_hash("cuda") != at_current
    assert config.run_hash("cuda", version=aace.__version__) == config.run_hash("cuda")
    monkeypatch.undo()
    assert config.run_hash("cuda", version="9.9.9") != at_current
