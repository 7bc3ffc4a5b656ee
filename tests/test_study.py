"""The study: validation split, rho choice, the worker pool, resumption, job-array commands, the export and
its integrity check, all at the smoke profile on the CPU."""
import json
import shlex
import shutil

import pytest
import torch

from aace import reference, results, study
from aace.cli import main as cli_main
from aace.config import profile_config
from aace.data import train_validation_split
from aace.store import load_run


def test_validation_split_is_disjoint_stratified_and_leaves_the_training_subset_as_it_was():
    labels = torch.arange(10).repeat_interleave(100)  # 10 classes x 100
    train, val = train_validation_split(labels, 200, 100, seed=3)
    assert len(train) == 200 and len(val) == 100
    assert not set(train.tolist()) & set(val.tolist())
    assert torch.bincount(labels[val], minlength=10).tolist() == [10] * 10
    from aace.data import stratified_subset
    assert torch.equal(train, stratified_subset(labels, 200, 3))  # switching validation on keeps the subset
    rest, val_all = train_validation_split(labels, None, 100, seed=3)
    assert len(rest) == 900 and not set(rest.tolist()) & set(val_all.tolist())
    with pytest.raises(ValueError, match=r"train_subset \+ RunConfig.val_subset.*1000"):
        train_validation_split(labels, 950, 100, seed=0)
    with pytest.raises(ValueError, match="val_subset"):
        train_validation_split(labels, None, 1000, seed=0)


def test_choose_rhos_takes_the_best_mean_validation_accuracy_and_needs_every_tuning_run():
    plan = study.Plan("smoke", {"sam": (0.05, 0.2)}, tuning_seeds=(1, 2), final_seeds=(0,))

    class Fake:
        def __init__(self, rho, seed, acc, status="finished"):
            self.config = profile_config("smoke", method="sam", rho=rho, seed=seed)
            self.summary, self.finished = {"val_acc": acc, "status": status}, status == "finished"
    runs = [Fake(0.05, 1, 0.8), Fake(0.05, 2, 0.7), Fake(0.2, 1, 0.9), Fake(0.2, 2, 0.7)]
    assert study.choose_rhos(plan, runs)["sam"]["rho"] == 0.2
    runs[2] = Fake(0.2, 1, 0.9, status="diverged")  # a diverged run counts as no accuracy
    assert study.choose_rhos(plan, runs)["sam"]["rho"] == 0.05
    with pytest.raises(ValueError, match="incomplete"):
        study.choose_rhos(plan, runs[:3])


@pytest.fixture(scope="module")
def smoke_study(smoke_study_store, tmp_path_factory):
    """The session's smoke study (trained once, conftest.smoke_study_store) and its export."""
    export_dir = tmp_path_factory.mktemp("export") / "smoke"
    argv = ["study", "--profile", "smoke", "--workers", "2", "--threads", "1", "--runs-dir", str(smoke_study_store),
            "--export", str(export_dir)]
    assert cli_main(argv) == 0
    return smoke_study_store, export_dir


def test_smoke_study_exports_its_runs_and_invocation_and_passes_its_integrity_check(smoke_study):
    runs_dir, export_dir = smoke_study
    meta, runs = results.load_export(export_dir)
    plan = study.PLANS["smoke"]
    n_tuning = sum(len(r) for r in plan.rhos.values()) * len(plan.tuning_seeds)
    assert len(runs) == n_tuning + (1 + len(plan.rhos)) * len(plan.final_seeds)
    assert results.check_export(export_dir) == []
    assert meta["aace_version"] and meta["git_commit"] and meta["command"].startswith("python -m aace study")
    assert meta["invocations"][0]["workers"] == 2
    assert all(r.metrics["val_acc"].notna().all() for r in runs)
    assert not any((r.path / "checkpoint.pt").exists() for r in runs)
    for key, choice in meta["chosen"].items():  # every final run of a tuned arm sits at its chosen rho
        finals = [r for r in runs if study.arm_key(r.config) == key and r.config.seed in plan.final_seeds]
        assert {r.config.rho for r in finals} == {choice["rho"]}


def test_study_resumes_without_training_again(smoke_study, capsys):
    runs_dir, _ = smoke_study
    before = {p: p.stat().st_mtime_ns for p in runs_dir.glob("*/*")}
    assert len(before) > 40   # every run's config, summary and tables
    assert cli_main(["study", "--profile", "smoke", "--workers", "2", "--threads", "1", "--runs-dir", str(runs_dir)]) == 0
    assert {p: p.stat().st_mtime_ns for p in runs_dir.glob("*/*")} == before
    assert "complete" in capsys.readouterr().out


def test_integrity_check_finds_a_config_that_does_not_hash_to_its_folder_even_with_its_digests_remade(smoke_study,
                                                                                                    tmp_path):
    _, export_dir = smoke_study
    broken = tmp_path / "broken"
    shutil.copytree(export_dir, broken)
    meta = json.loads((broken / "study.json").read_text())
    victim = meta["runs"][0]
    config_file = broken / "runs" / victim / "config.json"
    info = json.loads(config_file.read_text())
    info["config"]["lr"] = 0.5
    config_file.write_text(json.dumps(info))
    # someone who also rewrites the digests: the config no longer hashes to its folder's name
    meta["files"][f"runs/{victim}/config.json"] = results._sha256(config_file)
    meta["digest"] = results._record_digest(meta)
    (broken / "study.json").write_text(json.dumps(meta))
    assert any("hashes to" in p for p in results.check_export(broken))


def test_a_study_stopped_in_its_final_runs_records_its_invocation_as_incomplete(smoke_study, tmp_path, monkeypatch):
    store = tmp_path / "store"
    shutil.copytree(smoke_study[0], store)
    real, calls = study.run_pool, []

    def stopped_in_the_final_runs(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)
    monkeypatch.setattr(study, "run_pool", stopped_in_the_final_runs)
    with pytest.raises(KeyboardInterrupt):
        study.run_study("smoke", store, 2, log=lambda line: None, threads=1)
    last = json.loads((store / "study-smoke.json").read_text())[-1]
    assert last["ended"] == "SIGINT" and last["complete"] is False


def test_print_commands_gives_one_train_command_per_run_that_trains_that_config(smoke_study, capsys, tmp_path):
    runs_dir, _ = smoke_study
    # the study ran with --threads 1: so looked up, the store's tuning runs are found and the final runs'
    # commands follow
    assert cli_main(["study", "--profile", "smoke", "--runs-dir", str(runs_dir), "--print-commands",
                     "--threads", "1"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("python -m aace train")]
    plan = study.PLANS["smoke"]
    assert len(lines) == len(study.tuning_configs(plan)) + (1 + len(plan.rhos)) * len(plan.final_seeds)
    # the first command, run as printed (into another store), trains exactly the first tuning config
    argv = shlex.split(lines[0])[3:]
    argv[argv.index("--runs-dir") + 1] = str(tmp_path)
    assert cli_main(argv) == 0
    trained = load_run(next(tmp_path.glob("*-*")))
    assert trained.config == study.tuning_configs(plan, threads=1)[0]


def test_study_usage_errors_name_the_option():
    with pytest.raises(SystemExit):
        cli_main(["study", "--profile", "cpu"])  # a profile, but no study plan
    assert cli_main(["study", "--profile", "smoke", "--workers", "0"]) == 2


def test_main_comparison_reads_the_reference_export_and_trains_only_what_it_lacks(smoke_study, tmp_path, monkeypatch):
    from aace import claims, comparison, reference
    _, export_dir = smoke_study
    monkeypatch.setitem(reference.REFERENCES["smoke"], "clean",
                        reference.Testbed("clean", "smoke", str(export_dir), "clean labels"))
    store = tmp_path / "store"
    comp = comparison.main_comparison("smoke", runs_dir=store, workers=2)
    assert not list(store.glob("*-*"))  # read from the export: nothing trained
    plan = study.PLANS["smoke"]
    assert list(comp.runs) == [study.ALL_ARMS[k].name for k in plan.final_arms]
    assert all(sorted(r.config.seed for r in rs) == list(plan.final_seeds) for rs in comp.runs.values())
    for key in plan.rhos:
        assert {r.config.rho for r in comp.runs[study.ALL_ARMS[key].name]} == {comp.rho_of(key)}
    assert len(comp.tuning_frame()) == len(study.tuning_configs(plan))
    assert comp.tuning_table()["chosen"].tolist().count("◀") == len(plan.rhos)
    arms, verdicts = comp.verdicts()
    assert len(verdicts) == 3 and verdicts["verdict"].str.len().gt(0).all()
    table = claims.evaluate(comp)
    assert len(table) == 5 and table.index[2].startswith("3a. Premise")
    assert table["verdict"].str.len().gt(0).all()
    # one more seed: the export's runs are read in place, only that seed's final runs train
    more = comparison.main_comparison("smoke", seeds=[*plan.final_seeds, 7], runs_dir=store, workers=2)
    trained = [load_run(p) for p in store.glob("*-*") if (p / "summary.json").is_file()]
    assert len(trained) == len(plan.final_arms) and {r.config.seed for r in trained} == {7}
    assert [r.summary for r in more.runs["SAM"][:-1]] == [r.summary for r in comp.runs["SAM"]]
    with pytest.raises(ValueError, match="profile"):
        comparison.main_comparison("gpu-typo")
    monkeypatch.setitem(reference.REFERENCES["smoke"], "clean",
                        reference.Testbed("clean", "smoke", str(tmp_path / "nowhere"), "clean labels"))
    with pytest.raises(ValueError, match="clean reference study .* cannot be read: .*holds no export"):
        comparison.main_comparison("smoke")


def test_ensure_trains_missing_single_thread_runs_in_a_pool_with_the_same_numbers(tmp_path, monkeypatch):
    from aace import experiments as ex
    from aace.train import run
    arm = ex.Arm.of("SAM", method="sam")
    grid = ex.configs("smoke", [arm], [0, 1], epochs=1, val_subset=None)
    pooled = ex.ensure(grid, tmp_path / "pooled", workers=2)[arm]
    alone = [run(c, tmp_path / "alone", progress=False) for c in grid[arm]]
    assert [r.summary["test_acc"] for r in pooled] == [r.summary["test_acc"] for r in alone]
    assert [r.metrics.train_loss.tolist() for r in pooled] == [r.metrics.train_loss.tolist() for r in alone]
    # without a runs_dir the workers train into the default store ($AACE_RUNS), as the pages' runs do
    monkeypatch.setenv("AACE_RUNS", str(tmp_path / "default"))
    monkeypatch.chdir(tmp_path)
    ex.ensure(grid, workers=2)
    assert len(list((tmp_path / "default").glob("sam-*/summary.json"))) == 2 and not (tmp_path / "None").exists()


def test_noise_testbed_noises_training_and_validation_labels_apart_and_leaves_the_test_set_clean():
    from aace.config import RunConfig
    from aace.train import prepare_data
    noisy = profile_config("cpu-noise", train_subset=200, val_subset=100, test_subset=100)
    clean = noisy.replace(label_noise=0.0, validation_label_noise=False)
    cpu = torch.device("cpu")
    _, train, test, val, _ = prepare_data(noisy, cpu)
    _, train0, test0, val0, _ = prepare_data(clean, cpu)
    assert torch.equal(train.images, train0.images) and torch.equal(val.images, val0.images)
    assert (train.labels != train0.labels).float().mean() == 0.4 and (val.labels != val0.labels).float().mean() == 0.4
    assert torch.equal(test.labels, test0.labels)
    with pytest.raises(ValueError, match="RunConfig.validation_label_noise"):
        RunConfig(validation_label_noise=True)


@pytest.mark.parametrize("name", sorted({bed.plan for bed in reference.TESTBEDS.values() if bed.key != "imbalanced"}))
def test_reference_plans_tune_every_arm_on_a_grid_and_run_fresh_paired_seeds(name):
    plan = study.PLANS[name]
    main_arms = {*study.BASELINE_ARMS, *study.TUNED_ARMS}
    assert set(plan.rhos) == set(study.TUNED_ARMS) and main_arms <= set(plan.final_arms) <= set(study.ALL_ARMS)
    assert all(len(v) >= 4 for v in plan.rhos.values())
    assert not set(plan.tuning_seeds) & set(plan.final_seeds)
    chosen = {k: v[1] for k, v in plan.rhos.items()}
    finals = study.final_configs(plan, chosen)
    assert {study.arm_key(c) for c in finals} == main_arms
    ls = [c for c in finals if study.arm_key(c) == "sgd_ls"]
    assert {c.label_smoothing for c in ls} == {plan.rhos["sgd_ls"][1]} and {c.rho for c in ls} == {0.0}
    for c in study.tuning_configs(plan) + finals:  # one thread (found on any machine), a validation split, the whole test set at the end
        assert c.threads == 1 and c.val_subset and c.final_full_test and c.subset_seed is None
    for c in study.tuning_configs(plan) + finals:
        assert c.threads == 1 and c.val_subset and c.final_full_test
        assert study.tuned_value(study.arm_key(c), c) in (0.0, *plan.rhos.get(study.arm_key(c), ()))


def test_exact_ties_go_to_the_smaller_value():
    # The clean export's label smoothing tie: (0.804 + 0.815) / 2 and (0.808 + 0.811) / 2 differ as floats
    # (0.8095 and 0.8095000000000001) but not as counts of images; the declared rule takes the smaller value.
    plan = study.Plan("smoke", {"sgd_ls": (0.02, 0.1, 0.2)}, tuning_seeds=(1, 2), final_seeds=(0,))

    class Fake:
        def __init__(self, value, seed, acc):
            self.config = profile_config("smoke", method="sgd", label_smoothing=value, seed=seed)
            self.summary, self.finished = {"val_acc": acc, "status": "finished"}, True
    runs = [Fake(0.02, 1, 0.804), Fake(0.02, 2, 0.815), Fake(0.1, 1, 0.5), Fake(0.1, 2, 0.5),
            Fake(0.2, 1, 0.808), Fake(0.2, 2, 0.811)]
    assert (0.808 + 0.811) / 2 > (0.804 + 0.815) / 2  # the float comparison that chose 0.2
    chosen = study.choose_rhos(plan, runs)["sgd_ls"]
    assert chosen["rho"] == 0.02 and chosen["edge"] == "lowest"
    assert chosen["table"]["0.02"] == chosen["table"]["0.2"]


def test_crossed_arms_run_one_arm_at_another_arms_chosen_value():
    plan = study.PLANS["cpu-noise-reference"]
    by_arm = study.final_configs_by_arm(plan, {"sgd_ls": 0.8, "sam": 0.2, "aace": 1.0, "aace_normalised": 0.5})
    assert {c.rho for c in by_arm["sam_at_normalised_rho"]} == {0.5}
    assert {(c.method, c.normalize) for c in by_arm["sam_at_normalised_rho"]} == {("sam", True)}
    assert {c.rho for c in by_arm["aace_normalised_at_sam_rho"]} == {0.2}
    assert {(c.method, c.normalize) for c in by_arm["aace_normalised_at_sam_rho"]} == {("aace", True)}
    assert all(len(v) == 50 for v in by_arm.values()) and len(by_arm) == 7
    # Two arms that chose the same value share their runs: each config is trained once.
    same = study.final_configs(plan, {"sgd_ls": 0.8, "sam": 0.5, "aace": 1.0, "aace_normalised": 0.5})
    assert len(same) == len(set(same)) == 5 * 50


def test_a_choice_at_the_end_of_its_grid_is_flagged():
    plan = study.Plan("smoke", {"sam": (0.01, 0.05, 0.2)}, tuning_seeds=(1,), final_seeds=(0,))

    class Fake:
        def __init__(self, rho, acc):
            self.config = profile_config("smoke", method="sam", rho=rho, seed=1)
            self.summary, self.finished = {"val_acc": acc, "status": "finished"}, True
    chosen = study.choose_rhos(plan, [Fake(0.01, 0.9), Fake(0.05, 0.8), Fake(0.2, 0.7)])
    assert chosen["sam"]["edge"] == "lowest" and "lowest value of its grid" in study.edge_warnings(chosen)[0]
    chosen = study.choose_rhos(plan, [Fake(0.01, 0.7), Fake(0.05, 0.9), Fake(0.2, 0.7)])
    assert chosen["sam"]["edge"] is None and study.edge_warnings(chosen) == []
