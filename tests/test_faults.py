"""The red team's reproductions below the study (issue 22, items 7, 8, 10, 11, 13): each must end in a named
error or a clean result, never a traceback or a state the next call trips over."""
import gzip
import json
import tomllib
from pathlib import Path

import pytest
import torch

import aace
from aace import signals, store
from aace.cli import main as cli_main
from aace.config import RunConfig, profile_config
from aace.train import run

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--profile", "smoke", "--epochs", "1", "--train-subset", "64", "--test-subset", "32", "--no-progress"]


def one_line_error(capsys, *words):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    for w in words:
        assert w in err[0], err[0]
    return err[0]


# ----------------------------------------------------------------------------- 11: the library

def small_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 3))


def test_an_error_in_the_second_pass_leaves_the_weights_at_w_and_the_next_step_works():
    model = small_model()
    opt = aace.SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 4, generator=g), torch.randint(0, 3, (16,), generator=g)
    before = [p.detach().clone() for p in model.parameters()]

    def failing_update(z, t):
        raise RuntimeError("out of memory (injected)")
    with pytest.raises(RuntimeError, match="injected"):
        aace.sam_step(model, opt, x, y, aace.aace_loss, failing_update)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))  # back at w, not at w + e
    result = aace.sam_step(model, opt, x, y, aace.aace_loss, torch.nn.functional.cross_entropy)
    assert torch.isfinite(result.loss)


@pytest.mark.parametrize("kwargs,words", [(dict(rho=float("inf")), "rho must be a finite number"),
                                          (dict(rho=float("nan")), "rho must be a finite number"),
                                          (dict(eps=-1e-12), "eps must be a finite number >= 0"),
                                          (dict(eps=float("inf")), "eps must be a finite number >= 0")])
def test_sam_refuses_an_infinite_rho_or_a_bad_eps(kwargs, words):
    with pytest.raises(ValueError, match=words):
        aace.SAM(small_model().parameters(), torch.optim.SGD, lr=0.1, **kwargs)


def test_an_empty_batch_is_named_as_such():
    model = small_model()
    opt = aace.SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="batch is empty"):
        aace.sam_step(model, opt, torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), aace.aace_loss,
                      torch.nn.functional.cross_entropy)


def test_rand_targets_follow_float64_logits():
    g = torch.Generator().manual_seed(0)
    z, y = torch.randn(6, 10, generator=g, dtype=torch.float64), torch.arange(6)
    loss = aace.aace_loss(z, y, mode="rand", threshold=0.3, generator=torch.Generator().manual_seed(2))
    assert loss.dtype == torch.float64 and torch.isfinite(loss)
    t = aace.aace_target(z, y, "rand", 0.3, generator=torch.Generator().manual_seed(2))
    assert t.dtype == torch.float64
    # float32 logits draw exactly what they drew before (the runs' numbers do not move)
    t32 = aace.aace_target(z.float(), y, "rand", 0.0, generator=torch.Generator().manual_seed(2))
    expected = 1.0 - torch.rand(z.shape, generator=torch.Generator().manual_seed(2))
    expected = expected.masked_fill(torch.nn.functional.one_hot(y, 10).bool(), 0.0)
    torch.testing.assert_close(t32, expected / expected.sum(1, keepdim=True), rtol=0, atol=0)


@pytest.mark.parametrize("call,words", [
    (lambda: run({"method": "sam"}), "RunConfig(**d)"),
    (lambda: aace.aace_loss([[1.0, 2.0]], [0]), "logits must be a torch.Tensor"),
    (lambda: aace.aace_loss(torch.zeros(1, 2), [0]), "target must be a torch.Tensor"),
    (lambda: aace.frozen_bn_stats("model").__enter__(), "expected a torch.nn.Module"),
])
def test_wrong_types_are_named(call, words):
    with pytest.raises(ValueError) as err:
        call()
    assert words in str(err.value)


# ----------------------------------------------------------------------------- 10: settings that used to pass validation

@pytest.mark.parametrize("argv,words", [
    (["--seed", "20000000000000"], "RunConfig.seed"),
    (["--test-subset", "20000"], "RunConfig.test_subset"),
    (["--train-subset", "70000", "--val-subset", "none"], "RunConfig.train_subset"),
    (["--data-root", ""], "RunConfig.data_root"),
])
def test_settings_that_cannot_run_fail_by_name_and_leave_no_run_folder(tmp_path, capsys, argv, words):
    assert cli_main(["train", *TINY, "--runs-dir", str(tmp_path), *argv]) == 2
    one_line_error(capsys, words)
    assert list(tmp_path.iterdir()) == []


def test_a_data_error_leaves_no_run_folder_behind(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert cli_main(["train", *TINY, "--runs-dir", str(tmp_path / "runs"), "--data-root", str(tmp_path / "empty")]) == 3
    one_line_error(capsys, "holds no Fashion-MNIST IDX file")
    assert not (tmp_path / "runs").exists() or list((tmp_path / "runs").iterdir()) == []


def test_the_largest_seed_runs(tmp_path):
    assert run(profile_config("smoke", method="sgd", epochs=1, train_subset=64, test_subset=32, seed=2 ** 32 - 1),
               tmp_path, progress=False).finished
    with pytest.raises(ValueError, match="RunConfig.seed"):
        RunConfig(seed=2 ** 32)


# ----------------------------------------------------------------------------- 8: a damaged compressed file

def test_a_gz_file_with_a_damaged_stream_is_a_dataset_error(tmp_path, capsys):
    source = Path("/usr/share/datasets/fashion-mnist")
    for f in source.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    damaged = bytearray(gzip.compress(b"\0" * 100_000))
    damaged[12:40] = b"\xff" * 28  # the deflate stream itself, past the gzip header: zlib.error, not BadGzipFile
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(bytes(damaged))
    assert cli_main(["train", *TINY, "--runs-dir", str(tmp_path / "runs"), "--data-root", str(tmp_path)]) == 3
    one_line_error(capsys, "t10k-images-idx3-ubyte.gz", "Replace the file")


# ----------------------------------------------------------------------------- 7: a summary with a bad status

@pytest.mark.parametrize("status", [None, 5, "done"])
def test_runs_lists_a_summary_with_a_bad_status_as_unreadable(tmp_path, capsys, status):
    good = run(profile_config("smoke", method="sgd", epochs=1, train_subset=64, test_subset=32), tmp_path,
               progress=False)
    bad = run(profile_config("smoke", method="sam", epochs=1, train_subset=64, test_subset=32), tmp_path,
              progress=False)
    (bad.path / "summary.json").write_text(json.dumps({"status": status}))
    capsys.readouterr()
    assert cli_main(["runs", "--runs-dir", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith(good.path.name) and "finished" in line for line in lines)
    row = next(line for line in lines if line.startswith(bad.path.name))
    assert "unreadable" in row and "status" in row
    assert run(bad.config, tmp_path, progress=False).finished  # training it again rebuilds the summary


# ----------------------------------------------------------------------------- 13: packaging

def test_the_version_has_one_source_and_no_wheel_is_committed():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "version" not in project and "version" in project["dynamic"]
    from importlib.metadata import version
    assert version("aace") == aace.__version__
    assert not list(ROOT.glob("*.whl"))
    assert store.STATUSES  # the statuses a summary may hold are named in one place


def test_a_killed_writers_temporary_files_go_when_the_run_resumes(tmp_path):
    config = profile_config("smoke", method="sgd", epochs=2, train_subset=64, test_subset=32)
    first = run(config, tmp_path, progress=False)
    store.write_summary(first.path, {"status": "running", "epochs_done": 2, "epochs": 2})  # as if killed at the end
    for name in ("config.json.tmp", "checkpoint.pt.tmp"):  # what a SIGKILL in the middle of a write leaves
        (first.path / name).write_text("half")
    assert run(config, tmp_path, progress=False).finished
    assert not list(first.path.glob("*.tmp"))


@pytest.mark.parametrize("sig, raised", [("SIGTERM", signals.Terminated), ("SIGINT", KeyboardInterrupt)])
def test_a_signal_between_the_two_tables_waits_until_both_are_written(tmp_path, monkeypatch, sig, raised):
    """A SIGTERM that arrived between metrics.csv and steps.csv left a stopped run one epoch short in steps.csv
    (seen once in a signal test under load): the signal now waits for both, then stops the run as before."""
    import os
    import signal
    result = run(profile_config("smoke", epochs=2), tmp_path, progress=False)
    path = result.path
    real, written = store._atomic_write_text, []

    def write_then_signal(file, text):
        real(file, text)
        written.append(file.name)
        if file.name == "metrics.csv":  # the signal lands between the two tables
            os.kill(os.getpid(), getattr(signal, sig))
    monkeypatch.setattr(store, "_atomic_write_text", write_then_signal)
    checkpoint = store.load_checkpoint(path, torch.device("cpu"))
    # Python's own Ctrl-C handler, as under a terminal: a suite started in the background (nohup ... &) inherits
    # SIGINT ignored, and an ignored signal rightly raises nothing (a fresh clone's run under nohup failed here).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with signals.sigterm_raises(), pytest.raises(raised):
            store.write_tables(path, checkpoint["epoch_rows"], checkpoint["step_stats"])
    finally:
        signal.signal(signal.SIGINT, previous)
    assert written == ["metrics.csv", "steps.csv"]
    assert store.load_run(path).metrics.shape[0] == 2  # the two tables agree: the run reads back


def test_an_unfinished_run_killed_between_its_two_tables_reads_back_and_resumes(tmp_path):
    """SIGKILL cannot wait: a worker killed between metrics.csv and steps.csv (seen in a signal test under load)
    leaves steps.csv an epoch short. Unfinished, the run reads back to the epochs both tables hold and resumes;
    finished, the same mismatch is damage."""
    import pandas as pd
    config = profile_config("smoke", method="sgd", epochs=2, train_subset=64, test_subset=32)
    path = run(config, tmp_path, progress=False).path
    steps = pd.read_csv(path / "steps.csv")
    steps[steps["epoch"] == 1].to_csv(path / "steps.csv", index=False)
    with pytest.raises(store.CorruptRun, match="steps.csv does not cover the 2 epochs"):
        store.load_run(path)
    store.write_summary(path, {"status": "running", "epoch": 2, "epochs": 2})  # as the killed worker left it
    stopped = store.load_run(path)
    assert len(stopped.metrics) == 1 and set(stopped.steps["epoch"]) == {1}
    resumed = run(config, tmp_path, progress=False)
    assert resumed.finished and len(resumed.metrics) == 2 and set(resumed.steps["epoch"]) == {1, 2}
