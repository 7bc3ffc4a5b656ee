"""The Slurm executor (issue 35): its options and messages without a cluster, then against a real single-node
Slurm (tests/slurm_cluster.py): the smoke study end to end, a job cancelled mid-run and resumed by a second
submission, the exported numbers bit-identical to the local pool's; Ctrl-C cancels the array; a queue that never
starts ends the study; two jobs on one config are serialised by the run's lock."""
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from aace import results, slurm, study
from aace.cli import main as cli_main
from aace.store import run_dir

import slurm_cluster

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- without a cluster

@pytest.mark.parametrize("argv, message", [
    (["--slurm-partition", "gpu"], "--slurm-partition: only with --executor slurm"),
    (["--executor", "slurm", "--workers", "2"], "--workers: the local pool's"),
])
def test_slurm_options_are_refused_where_they_mean_nothing(argv, message, tmp_path, capsys):
    code = cli_main(["study", "--profile", "smoke", "--runs-dir", str(tmp_path), *argv])
    assert code == 2 and message in capsys.readouterr().err


def test_the_executor_names_a_machine_without_slurm(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch, no squeue
    assert cli_main(["study", "--profile", "smoke", "--runs-dir", str(tmp_path), "--executor", "slurm"]) == 2
    assert "no sbatch or squeue on this machine's PATH" in capsys.readouterr().err


@pytest.mark.parametrize("options, message", [
    (dict(time_minutes=0), "--slurm-time: expected an integer >= 1, got 0"),
    (dict(cpus_per_run=1.5), "--slurm-cpus-per-run: expected an integer >= 1"),
    (dict(gpus_per_run=-1), "--slurm-gpus-per-run: expected an integer >= 0"),
    (dict(max_parallel=True), "--slurm-max-parallel"),
    (dict(pending_limit_minutes=float("inf")), "--slurm-pending-limit: expected a number of minutes > 0"),
    (dict(partition=" "), "--slurm-partition: expected a partition name"),
    (dict(extra={"time": 5}), "--slurm-config: \\['time'\\] are set by the --slurm-\\* options"),
    (dict(extra=[1]), "--slurm-config: expected a JSON object"),
])
def test_slurm_options_name_the_option_and_what_was_expected(options, message):
    with pytest.raises(ValueError, match=message):
        slurm.SlurmOptions(**options)


def test_a_slurm_config_file_that_is_not_json_is_named(tmp_path):
    bad = tmp_path / "slurm.json"
    bad.write_text("account: me")
    with pytest.raises(ValueError, match=f"--slurm-config {bad}: not JSON"):
        slurm.SlurmOptions.from_file(bad)
    with pytest.raises(ValueError, match="cannot read it"):
        slurm.SlurmOptions.from_file(tmp_path / "missing.json")


def test_the_store_folder_is_the_jobs_device_not_the_login_nodes():
    config = study.arm_config(study.PLANS["gpu"], "sam", 0, 0.1)
    assert config.device == "auto"
    assert slurm.SlurmOptions(gpus_per_run=1).device_type(config) == "cuda"
    assert slurm.SlurmOptions().device_type(config) == "cpu"
    with pytest.raises(ValueError, match="--slurm-gpus-per-run: the runs train on 'cuda'"):
        slurm.SlurmOptions().device_type(dataclasses.replace(config, device="cuda"))


def test_queue_states_expand_pending_ranges(tmp_path, monkeypatch):
    fake = tmp_path / "squeue"
    fake.write_text("#!/bin/sh\nprintf '12_[3-5%%2]|PENDING|JobArrayTaskLimit\\n12_1|RUNNING|None\\n"
                    "12_0|CANCELLED|None\\n'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    states = slurm.queue_states(["12_0"])
    assert states == {"12_0": ("CANCELLED", "None"), "12_1": ("RUNNING", "None"),
                      "12_3": ("PENDING", "JobArrayTaskLimit"), "12_4": ("PENDING", "JobArrayTaskLimit"),
                      "12_5": ("PENDING", "JobArrayTaskLimit")}
    fake.write_text("#!/bin/sh\necho 'slurm_load_jobs error: Unable to contact slurm controller' >&2; exit 1\n")
    assert slurm.queue_states(["12_0"]) is None


@pytest.mark.parametrize("code, state, says", [
    (143, "CANCELLED", "was stopped by SIGTERM (cancelled, pre-empted or out of time) (Slurm state CANCELLED)"),
    (None, "TIMEOUT", "left the queue without a result (Slurm state TIMEOUT)"),
    (None, "", "left the queue without a result (its state aged out of squeue)"),
    (4, "COMPLETED", "ended with exit code 4"),
])
def test_a_failed_job_is_told_in_words(code, state, says):
    assert slurm._what_happened(code, state) == says


# ----------------------------------------------------------------------------- on a real single-node Slurm

@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    started, why = slurm_cluster.start(tmp_path_factory.mktemp("slurm"))
    if started is None:
        pytest.skip(why)
    yield started
    started.stop()


def _study(cluster, runs_dir, *more, export=None):
    argv = [sys.executable, "-m", "aace", "study", "--profile", "smoke", "--runs-dir", str(runs_dir),
            "--executor", "slurm", "--slurm-cpus-per-run", "1", *more, *(["--export", str(export)] if export else [])]
    # SIGINT back to its default in the child, so that Python installs its Ctrl-C handler there: a shell starts
    # background jobs (make test under nohup ... &) with SIGINT ignored, and the child would inherit that.
    return subprocess.Popen(argv, cwd=ROOT, env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for(predicate, seconds, what):
    deadline = time.time() + seconds
    while time.time() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"{what} did not happen in {seconds} s")


@pytest.mark.slow
def test_the_smoke_study_on_slurm_survives_a_cancelled_job_and_matches_the_local_pool_bit_for_bit(cluster, tmp_path,
                                                                                                  smoke_study_store):
    # The smoke study's store less three runs: two tuning runs and one final of a tuned arm, so that each phase
    # submits an array (the rest is read back), one of its jobs is cancelled mid-run, and what Slurm trains is
    # compared with what the local pool trains of the same three. (Training the whole study twice cost 5 minutes.)
    store, export = tmp_path / "slurm-store", tmp_path / "slurm-export"
    shutil.copytree(smoke_study_store, store, ignore=shutil.ignore_patterns("study-*.json", "lock"))
    plan = study.PLANS["smoke"]
    from aace.train import resolve_device
    tuning = [run_dir(c, resolve_device("cpu"), store) for c in study.tuning_configs(plan, threads=1)[:2]]
    final = next(p for p in sorted(store.glob("aace-*")) if (lambda c: c["method"] == "aace" and not c["normalize"]
                 and c["seed"] == 1)(json.loads((p / "config.json").read_text())["config"]))
    local_store = tmp_path / "local-store"
    shutil.copytree(store, local_store)
    for folder in (*tuning, final):
        shutil.rmtree(folder)
        shutil.rmtree(local_store / folder.name)
    process = _study(cluster, store, "--slurm-max-parallel", "2", export=export)

    def a_running_task_with_a_checkpoint():  # array task i runs the i-th run the store lacks: here, tuning[i]
        line = cluster.run("squeue", "-h", "-t", "RUNNING", "-o", "%i", check=False).split()
        ids = [i for i in line if "_" in i and (tuning[int(i.split("_")[1])] / "checkpoint.pt").exists()]
        return ids[0] if ids else None
    victim = _wait_for(a_running_task_with_a_checkpoint, 240, "a running job with a checkpoint")
    cluster.run("scancel", victim)
    out, _ = process.communicate(timeout=600)
    assert process.returncode == slurm.SLURM_FAILED, out
    assert "submitted 2 runs as Slurm job array" in out, out
    failed = [line for line in out.splitlines() if line.startswith("FAILED:")]
    assert len(failed) == 1 and f"Slurm job {victim} " in failed[0] and "(log " in failed[0], out
    log = Path(failed[0].split("(log ")[1].split(")")[0])
    assert log.is_file()
    assert "resumes from its last checkpoint" in failed[0]
    assert json.loads((tuning[int(victim.split("_")[1])] / "summary.json").read_text())["status"] == "interrupted"

    again = _study(cluster, store, export=export)  # the second submission resumes the cancelled run
    out, _ = again.communicate(timeout=600)
    assert again.returncode == 0, out
    assert out.count("submitted 1 run as Slurm job array") == 2, out  # the cancelled run, then the final
    assert results.check_export(export) == []

    local = tmp_path / "local-export"  # the same study, its same three runs trained here by the local pool
    assert cli_main(["study", "--profile", "smoke", "--workers", "2", "--threads", "1", "--runs-dir",
                     str(local_store), "--export", str(local)]) == 0
    slurm_study, slurm_runs = results.load_export(export)
    local_study, local_runs = results.load_export(local)
    assert slurm_study["chosen"] == local_study["chosen"]
    assert sorted(slurm_study["runs"]) == sorted(local_study["runs"])  # one hash, one folder: the same runs
    by_name = {r.path.name: results._results(r) for r in local_runs}
    assert {r.path.name: results._results(r) for r in slurm_runs} == by_name
    assert {f.name for f in (*tuning, final)} <= set(by_name)
    assert slurm_study["invocations"][-1]["executor"] == "slurm"
    # the second submission trained the cancelled run and the final; the runs it read back are not counted
    assert slurm_study["invocations"][-1]["runs_trained"] == 2, slurm_study["invocations"]


@pytest.mark.slow
def test_ctrl_c_cancels_the_array_and_says_so(cluster, tmp_path):
    process = _study(cluster, tmp_path / "store", "--slurm-max-parallel", "1")
    lines = []

    def submitted():
        lines.append(process.stdout.readline())
        return "submitted" in lines[-1] and lines[-1]
    line = _wait_for(submitted, 120, "the submission")
    array = line.split("job array ")[1].split()[0]
    _wait_for(lambda: "RUNNING" in cluster.states(array), 60, "a running task")
    process.send_signal(signal.SIGINT)
    out, _ = process.communicate(timeout=120)
    assert process.returncode == 130
    assert f"cancelled Slurm job array {array}" in out
    assert _wait_for(lambda: not {"PENDING", "RUNNING", "COMPLETING"} & set(cluster.states(array)), 60,
                     "the array's end")


@pytest.mark.slow
def test_a_queue_that_never_starts_ends_the_study_with_a_message(cluster, tmp_path):
    config = tmp_path / "slurm.json"
    config.write_text(json.dumps({"additional_parameters": {"begin": "now+1hour"}}))
    process = _study(cluster, tmp_path / "store", "--slurm-pending-limit", "0.1", "--slurm-config", str(config))
    out, _ = process.communicate(timeout=120)
    assert process.returncode == slurm.SLURM_FAILED, out
    assert "none running (squeue's reason: BeginTime)" in out and "cancelled them" in out
    array = out.split("job array ")[1].split()[0]
    assert not {"PENDING", "RUNNING"} & set(cluster.states(array))


@pytest.mark.slow
def test_two_jobs_on_one_config_are_serialised_by_the_runs_lock(cluster, tmp_path):
    from aace.pool import train_command
    config = study.arm_config(study.PLANS["smoke"], "sgd", 0)
    command = train_command(config, "smoke", tmp_path / "store").replace("python", sys.executable, 1)
    ids = []
    for i in range(2):
        out = cluster.run("sbatch", "--parsable", f"--chdir={ROOT}", "-o", str(tmp_path / f"job{i}.log"),
                          "--wrap", command)
        ids.append(out.strip())
    for job in ids:
        _wait_for(lambda: cluster.states(job) == ["COMPLETED"], 240, f"job {job}")
    logs = [(tmp_path / f"job{i}.log").read_text() for i in range(2)]
    assert sorted(" (trained): " in log for log in logs) == [False, True], logs
    assert sum(" (read from the store): " in log for log in logs) == 1, logs


def test_the_gpu_pages_study_cost_follows_from_the_measured_step_times():
    from benchmarks import paper_scale
    measured = json.loads((ROOT / "benchmarks" / "paper_scale.json").read_text())
    assert (ROOT / "benchmarks" / "paper_scale.md").read_text() == paper_scale.to_markdown(measured)
    rows = {r["method"]: r["seconds_per_step"] for r in measured["rows"] if r["model"].startswith("wrn-28-10")}
    steps = -(-45_000 // 256) * 200  # CIFAR-100's 50,000 training images less the 5,000 held out, batch 256
    # tuning: SAM's 6 values, AACE's 5 and normalised AACE's 6, one seed each; finals: 5 seeds of SGD and each arm
    expected = (6 * rows["sam"] + 11 * rows["aace"] + 5 * rows["sgd"] + 5 * rows["sam"] + 10 * rows["aace"]) * steps
    tuning, final, hours = paper_scale.study_cost(measured)["wrn-28-10 (authors)"]
    assert (tuning, final) == (17, 20) and hours == pytest.approx(expected / 3600)
