import json

import pytest
import torch

from aace import store
from aace.cli import main as cli_main
from aace.config import PROFILES, RunConfig, profile_config
from aace.train import learning_rate, run

FAST = dict(epochs=2, train_subset=128, test_subset=100, batch_size=32)


def smoke(method="sam", **kw):
    return profile_config("smoke", method=method, **{**FAST, **kw})


def final_weights(result):
    return store.load_checkpoint(result.path, torch.device("cpu"))["model"]


@pytest.mark.parametrize("method", ["sgd", "sam", "aace"])
def test_smoke_run_for_each_method(tmp_path, method):
    result = run(smoke(method), tmp_path, progress=False)
    assert result.finished
    m = result.metrics
    assert list(m["epoch"]) == [1, 2]
    for column in ("lr", "ce_loss", "aace_loss", "grad_norm", "perturbation_norm", "train_loss", "train_acc",
                   "test_loss", "test_acc", "perturbation_cosine", "epoch_seconds", "images_per_second"):
        assert column in m
    assert len(result.steps) == 2 * 4
    if method == "sam":
        assert (result.steps["perturbation_norm"] - 0.05).abs().max() < 1e-5
    if method == "aace":  # unnormalised: ||e|| = rho * ||g_AACE||
        torch.testing.assert_close(torch.tensor(result.steps["perturbation_norm"].values),
                                   0.2 * torch.tensor(result.steps["grad_norm"].values), rtol=1e-4, atol=1e-7)
    if method == "sgd":
        assert (result.steps["perturbation_norm"] == 0).all()
    info = json.loads((result.path / "config.json").read_text())
    assert info["environment"]["torch"] == torch.__version__ and info["train_size"] == 128


def test_finished_run_is_read_back_not_retrained(tmp_path):
    first = run(smoke(), tmp_path, progress=False)
    stamp = (first.path / "checkpoint.pt").stat().st_mtime_ns
    again = run(smoke(), tmp_path, progress=False)
    assert (again.path / "checkpoint.pt").stat().st_mtime_ns == stamp
    assert again.summary == first.summary


def test_same_config_same_numbers_bit_for_bit(tmp_path):
    a = run(smoke("aace"), tmp_path / "a", progress=False)
    b = run(smoke("aace"), tmp_path / "b", progress=False)
    assert a.metrics.drop(columns=["epoch_seconds", "images_per_second"]).equals(
        b.metrics.drop(columns=["epoch_seconds", "images_per_second"]))
    wa, wb = final_weights(a), final_weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_corrupt_checkpoint_detected_and_restart(tmp_path):
    config = smoke(epochs=3)
    result = run(smoke(epochs=3), tmp_path, progress=False)
    store.write_summary(result.path, {"status": "running"})
    data = (result.path / "checkpoint.pt").read_bytes()
    (result.path / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(store.CorruptRun, match="checkpoint.pt.*checksum.*--restart"):
        run(config, tmp_path, progress=False)
    fresh = run(config, tmp_path, progress=False, restart=True)
    assert fresh.finished and fresh.metrics.drop(columns=["epoch_seconds", "images_per_second"]).equals(
        result.metrics.drop(columns=["epoch_seconds", "images_per_second"]))


def test_divergence_recorded(tmp_path):
    result = run(smoke("sgd", lr=1e6), tmp_path, progress=False)
    assert result.status == "diverged"
    assert result.summary["epoch"] >= 1 and result.summary["step"] >= 1 and result.summary["loss"]


def test_learning_rate_schedules():
    config = RunConfig(epochs=10, lr=0.1, lr_schedule="step")
    assert [round(learning_rate(config, s, 100), 6) for s in (0, 29, 30, 59, 60, 79, 80, 99)] == \
        [0.1, 0.1, 0.02, 0.02, 0.004, 0.004, 0.0008, 0.0008]
    cosine = config.replace(lr_schedule="cosine")
    assert learning_rate(cosine, 0, 100) == 0.1 and abs(learning_rate(cosine, 50, 100) - 0.05) < 1e-12


def test_method_defaults_and_labels():
    assert RunConfig(method="sam").rho == 0.05 and RunConfig(method="sam").normalize is True
    aace = RunConfig(method="aace")
    assert aace.rho == 0.2 and aace.normalize is False
    assert aace.replace(method="sam").rho == 0.05
    assert aace.replace(normalize=True, rho=0.05).label() == "SAM+AACE (rho 0.05, normalised)"
    assert RunConfig(method="sam").run_hash("cpu", 2) != RunConfig(method="sam", seed=1).run_hash("cpu", 2)
    assert RunConfig(method="sam").run_hash("cpu", 2) == RunConfig(method="sam", threads=9).run_hash("cpu", 2)
    assert RunConfig(method="sam").run_hash("cpu", 2) != RunConfig(method="sam").run_hash("cpu", 1)
    assert RunConfig(method="sam").run_hash("cuda") == RunConfig(method="sam", threads=1).run_hash("cuda")
    assert RunConfig(method="sam").run_hash("cpu", 2) != RunConfig(method="sam").run_hash("cuda")
    with pytest.raises(ValueError, match="cpu_threads"):
        RunConfig().run_hash("cpu")


def test_thread_count_changes_the_numbers_so_it_changes_the_run(tmp_path):
    """1 and 2 CPU threads round differently: each must get its own run, never the other's numbers."""
    before = torch.get_num_threads()
    try:
        one = run(smoke("sam", epochs=1, threads=1), tmp_path, progress=False)
        two = run(smoke("sam", epochs=1, threads=2), tmp_path, progress=False)
    finally:
        torch.set_num_threads(before)
    assert one.path != two.path
    assert one.metrics["ce_loss"].tolist() != two.metrics["ce_loss"].tolist()


@pytest.mark.parametrize("field,value,allowed", [
    ("method", "adam", "sgd"), ("dataset", "mnist", "fashion_mnist"), ("model", "resnet-18", "wrn-D-K"),
    ("rho", -0.1, ">= 0"), ("rho", float("nan"), ">= 0"), ("epochs", 0, "integer >= 1"), ("epochs", 2.5, "integer"),
    ("batch_size", True, "integer"), ("lr_schedule", "linear", "cosine"), ("aace_mode", "adaptive", "ada"),
    ("aace_threshold", 2.0, r"\[0.0, 1.0\]"), ("label_smoothing", 1.0, r"\[0, 1\)"), ("momentum", -1, "number"),
    ("train_subset", 0, "integer >= 1"), ("seed", -1, r"\[0, 2\*\*32\)"), ("device", "tpu", "cuda"), ("normalize", "yes", "True"),
    ("augment", "heavy", "paper"), ("model_variant", "paper", "authors"),
])
def test_config_validation_names_field_and_allowed_values(field, value, allowed):
    with pytest.raises(ValueError, match=rf"RunConfig\.{field}.*{allowed}"):
        RunConfig(**{field: value})


def test_profiles_are_valid_and_overridable():
    for name in PROFILES:
        assert profile_config(name).epochs >= 1
    assert profile_config("paper").batch_size == 256 and profile_config("paper").model == "wrn-28-10"
    assert profile_config("cpu", epochs=3).epochs == 3
    with pytest.raises(ValueError, match="unknown RunConfig field"):
        profile_config("cpu", epoch=3)
    with pytest.raises(ValueError, match="profile"):
        profile_config("tpu")


def test_cli_usage_errors_name_the_option(capsys):
    with pytest.raises(SystemExit) as err:
        cli_main(["train", "--profile", "smoke", "--epochs", "many"])
    assert err.value.code == 2 and "--epochs" in capsys.readouterr().err
    assert cli_main(["train", "--profile", "smoke", "--rho", "-1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: RunConfig.rho") and len(err.strip().splitlines()) == 1


def test_cli_runs_lists_stored_runs(tmp_path, capsys):
    run(smoke("sgd"), tmp_path, progress=False)
    assert cli_main(["runs", "--runs-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "SGD" in out and "finished" in out


def test_related_losses_and_label_noise_from_the_command_line(tmp_path):
    args = ["train", "--profile", "smoke", "--method", "sam", "--perturbation-loss", "taylor_ce", "--update-loss",
            "focal", "--focal-gamma", "1.0", "--label-noise", "0.2", "--epochs", "1", "--train-subset", "128",
            "--test-subset", "64", "--no-progress", "--runs-dir", str(tmp_path)]
    assert cli_main(args) == 0
    (stored,) = store.list_runs(tmp_path)
    assert stored.config.perturbation_loss == "taylor_ce" and stored.config.label_noise == 0.2
    assert stored.config.label() == "SAM[taylor_ce] (rho 0.05, update focal)"
    with pytest.raises(ValueError, match="RunConfig.perturbation_loss"):
        RunConfig(method="aace", perturbation_loss="focal")
    with pytest.raises(ValueError, match="RunConfig.update_loss"):
        RunConfig(update_loss="aace")


@pytest.mark.parametrize("perturbation, update", [("cross_entropy", "dual_focal"), ("dual_focal", "taylor_ce"),
                                                  ("focal", "cross_entropy"), ("taylor_ce", "focal")])
def test_each_pass_uses_the_named_loss_with_its_options(perturbation, update):
    from aace.losses import LOSSES
    from aace.train import loss_functions
    config = RunConfig(method="sam", perturbation_loss=perturbation, update_loss=update, focal_gamma=0.7,
                       taylor_order=3, label_smoothing=0.1)
    logits, labels = torch.randn(8, 10, generator=torch.Generator().manual_seed(0)), torch.arange(8)
    perturbation_fn, update_fn = loss_functions(config)
    options = {"focal": {"gamma": 0.7}, "dual_focal": {"gamma": 0.7}, "taylor_ce": {"order": 3}}
    # label smoothing applies to the update pass only
    expected_update = LOSSES[update](logits, labels, **options.get(update, {"label_smoothing": 0.1}))
    expected_perturbation = LOSSES[perturbation](logits, labels, **options.get(perturbation, {}))
    assert torch.equal(update_fn(logits, labels), expected_update)
    assert torch.equal(perturbation_fn(logits, labels), expected_perturbation)
    aace_fn, _ = loss_functions(RunConfig(method="aace", aace_mode="const"))
    assert torch.equal(aace_fn(logits, labels), LOSSES["aace"](logits, labels, mode="const"))


def test_final_full_test_scores_the_last_epoch_on_every_test_image(tmp_path):
    result = run(smoke(final_full_test=True), tmp_path, progress=False)
    s = result.summary
    assert s["full_test_size"] == 10_000 and result.info["test_size"] == 100  # the curves keep their subset
    assert 0.0 <= s["full_test_acc"] <= 1.0 and s["full_test_acc"] != s["test_acc"]
    # without a test subset the last epoch already used every test image: no second evaluation
    whole = run(smoke(method="sgd", epochs=1, test_subset=None, final_full_test=True), tmp_path, progress=False)
    assert whole.summary["full_test_acc"] == whole.summary["test_acc"] and whole.summary["full_test_size"] == 10_000
    from aace import experiments as ex
    assert ex.final_value(result, ex.FINAL_TEST) == s["full_test_acc"] and ex.final_test_size(result) == 10_000
    plain = run(smoke(method="sgd", epochs=1), tmp_path, progress=False)
    assert ex.final_value(plain, ex.FINAL_TEST) == plain.summary["test_acc"] and ex.final_test_size(plain) == 100


def test_eval_every_scores_every_kth_epoch_and_always_the_last(tmp_path):
    result = run(smoke(epochs=5, eval_every=2, val_subset=50), tmp_path, progress=False)
    m = result.metrics
    scored = m.test_acc.notna().tolist()
    assert scored == [False, True, False, True, True]
    assert m.val_acc.notna().tolist() == scored and m.train_acc.notna().all()
    assert result.summary["test_acc"] == m.test_acc.iloc[-1]


def test_each_seed_draws_its_own_subsets_unless_subset_seed_is_given():
    from aace.data import load_dataset, train_validation_split
    train, _ = load_dataset("fashion_mnist")
    a, b = (profile_config("smoke", seed=s) for s in (0, 1))
    assert (a.data_seed, b.data_seed) == (0, 1)
    split_a = train_validation_split(train.labels, a.train_subset, a.val_subset, a.data_seed)[0]
    split_b = train_validation_split(train.labels, b.train_subset, b.val_subset, b.data_seed)[0]
    assert not torch.equal(split_a, split_b)
    assert profile_config("smoke", seed=1, subset_seed=0).data_seed == 0
    assert profile_config("smoke", seed=5).replace(seed=7).data_seed == 7  # follows the seed through replace
    with pytest.raises(ValueError, match="subset_seed"):
        profile_config("smoke", subset_seed=-1)
    with pytest.raises(ValueError, match="eval_every"):
        profile_config("smoke", eval_every=0)


@pytest.mark.parametrize("perturbation, update", [("exp_weighted_ce", "cross_entropy"),
                                                  ("cross_entropy", "exp_weighted_ce")])
def test_the_exponentially_weighted_loss_takes_the_long_tails_class_counts_in_either_pass(perturbation, update):
    from aace.losses import LOSSES
    from aace.train import loss_functions
    config = RunConfig(method="sam", perturbation_loss=perturbation, update_loss=update, train_subset=1000,
                       imbalance_ratio=100.0)
    logits = torch.randn(8, 10, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 9, 9, 3, 5, 1, 8, 0])
    fn = loss_functions(config)[0 if perturbation != "cross_entropy" else 1]
    expected = LOSSES["exp_weighted_ce"](logits, labels, class_counts=[100, 59, 35, 21, 12, 7, 4, 2, 1, 1])
    assert torch.equal(fn(logits, labels), expected)
    assert not torch.equal(expected, LOSSES["cross_entropy"](logits, labels))  # the weights do something


def test_a_long_tailed_run_trains_with_the_weighted_loss_from_the_command_line(tmp_path):
    args = ["train", "--profile", "smoke", "--method", "sam", "--perturbation-loss", "exp_weighted_ce",
            "--imbalance-ratio", "10", "--train-subset", "250", "--epochs", "1", "--no-progress", "--runs-dir",
            str(tmp_path)]
    assert cli_main(args) == 0
    (stored,) = store.list_runs(tmp_path)
    assert stored.config.imbalance_ratio == 10.0 and stored.info["train_size"] == sum(stored.config.class_counts())
