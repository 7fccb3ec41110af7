"""The command line: dispatch, flag parsing, config layering, user errors without tracebacks,
presets, report, sweep and demo."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest

from sparsam.__main__ import COMMANDS, main
from sparsam.train import ConfigError, build_config, list_presets
from sparsam.cli.train import build_parser, resolve
from sparsam.train.config import FIELDS, TrainConfig, flag, read_config_file

from .test_train_engine import TINY, metrics


def parse(*argv):
    return resolve(build_parser("sparsam train").parse_args(list(argv)))


# ------------------------------------------------------------------------------------------ config
def test_layers_defaults_preset_file_flags(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('lr = 0.2\nepochs = 3\nmask = "dynamic"\n')
    cfg = parse("--preset", "cifar100-resnet18-ssam-f", "--config", str(f), "--epochs", "7")
    assert cfg.model == "resnet18" and cfg.data == "cifar100"  # preset
    assert cfg.rho == 0.2 and cfg.weight_decay == 1e-3  # preset: CIFAR-100 SSAM
    assert cfg.lr == 0.2 and cfg.mask == "dynamic"  # file over preset
    assert cfg.epochs == 7  # flag over file
    assert cfg.momentum == TrainConfig().momentum  # default


def test_boolean_flags_parse_properly():
    assert parse("--nesterov").nesterov is True
    assert parse("--nesterov", "--no-nesterov").nesterov is False
    assert parse("--no-progress").progress is False
    assert parse().adaptive is None and parse("--no-adaptive", "--opt", "sam").adaptive is False
    assert parse("--clip", "none").clip is None and parse("--clip", "1.5").clip == 1.5
    assert parse("--betas", "0.8", "0.99").betas == [0.8, 0.99]


def test_every_field_has_a_flag():
    parser = build_parser("sparsam train")
    flags = {s for a in parser._actions for s in a.option_strings}
    for name in FIELDS:
        assert flag(name) in flags
    for required in (
        "--data",
        "--model",
        "--width",
        "--opt",
        "--sparsity",
        "--epochs",
        "--batch-size",
        "--lr",
        "--seed",
        "--out",
        "--resume",
        "--mask",
        "--pattern",
        "--granularity",
        "--nm",
        "--form",
        "--norm",
        "--base",
        "--momentum",
        "--weight-decay",
        "--nesterov",
        "--amp",
        "--accum",
        "--clip",
        "--compile",
        "--channels-last",
        "--tensorboard",
        "--no-progress",
        "--train-subset",
        "--download",
        "--num-samples",
        "--mask-update-epochs",
        "--dynamic-alpha",
        "--grow",
        "--eta",
        "--rho",
    ):
        assert required in flags, required


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--lr", "-0.1"], "--lr must be > 0, got -0.1"),
        (["--opt", "adam"], "argument --opt: invalid choice: 'adam'"),
        (["--sparsity", "1.5"], "--sparsity must be in [0, 1)"),
        (["--momentum", "1"], "--momentum must be in [0, 1)"),
        (["--epochs", "0"], "--epochs must be >= 1, got 0"),
        (["--nm", "4:2", "--pattern", "nm"], "--nm needs 1 <= N <= M, got '4:2'"),
        (["--batch-size", "10", "--accum", "3"], "--batch-size (10) must be divisible by --accum (3)"),
        (
            ["--opt", "ssam", "--mask", "dynamic", "--pattern", "structured"],
            "--mask dynamic supports only --pattern unstructured",
        ),
        (["--data", "/no/such/folder"], "--data '/no/such/folder' is neither a known data set"),
        (["--preset", "cifar10-resnet99-sam"], "--preset 'cifar10-resnet99-sam' is not a known preset"),
        (["--model", "resnet99", "--epochs", "1"], "--model 'resnet99'"),
        (["--lr", "abc"], "argument --lr: invalid float value: 'abc'"),
        (["--resume", "/no/such/run"], "--resume /no/such/run: no such run directory"),
    ],
)
def test_user_errors_name_the_value_without_a_traceback(argv, message, capsys, tmp_path):
    rc = main(["train", *argv, "--out", str(tmp_path / "r")] if "--resume" not in argv else ["train", *argv])
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err
    assert "Traceback" not in err


def test_config_file_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"lr": 0.1, "learning_rate": 0.2}')
    with pytest.raises(ConfigError, match="unknown configuration key 'learning_rate'"):
        read_config_file(bad)
    bad.write_text('{"epochs": "ten"}')
    with pytest.raises(ConfigError, match="--epochs .* must be an integer, got 'ten'"):
        read_config_file(bad)
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        read_config_file(bad)
    with pytest.raises(ConfigError, match="no such file"):
        read_config_file(tmp_path / "missing.toml")


def test_presets_all_validate_and_match_the_papers():
    presets = list_presets()
    for name in ("cifar10-resnet18", "cifar100-resnet18", "cifar10-wrn28-10", "cifar100-wrn28-10"):
        for method in ("sgd", "sam", "ssam-f", "ssam-d"):
            p = presets[f"{name}-{method}"].values
            assert (p["epochs"], p["batch_size"], p["lr"], p["momentum"]) == (200, 128, 0.05, 0.9)
            assert p["weight_decay"] == (5e-4 if method == "sgd" else 1e-3)
            assert p["augment"] == "cifar" and p["cutout"] == 16 and p["cutout_p"] == 0.5
            assert p["rho"] == (0.1 if name.startswith("cifar10-") else 0.2)
            # Ns: 16 in the NeurIPS README's CIFAR-10 command, 128 in the TPAMI README's CIFAR-100 ones;
            # SSAM-D updates every 5 epochs (the authors' argparse default). Sources: docs/differences.md.
            assert p["num_samples"] == (16 if name.startswith("cifar10-") else 128)
            assert p["mask_update_epochs"] == (5 if method == "ssam-d" else 1)
    r50 = presets["imagenet-resnet50-ssam-f"].values
    assert (r50["model"], r50["epochs"], r50["batch_size"], r50["weight_decay"], r50["rho"], r50["sparsity"]) == (
        "resnet50",
        90,
        256,
        1e-4,
        0.7,
        0.5,
    )
    assert presets["cifar10-wrn28-10-ssam-d"].values["model"] == "wrn28-10"
    for p in presets.values():  # every preset is a valid configuration (data paths aside)
        build_config([("p", {**p.values, "data": "digits"})])


def test_list_presets(capsys):
    assert main(["train", "--list-presets"]) == 0
    out = capsys.readouterr().out
    assert "cifar10-resnet18-ssam-f" in out and "imagenet-resnet50-sgd" in out


def test_dispatcher(capsys):
    assert main([]) == 0
    usage = capsys.readouterr().out
    assert all(name in usage for name in ("train", "demo", "sweep", "report"))
    assert main(["trian"]) == 2 and "did you mean 'train'" in capsys.readouterr().err
    assert set(COMMANDS) >= {"train", "demo", "sweep", "report"}


def test_entry_point_needs_no_optional_packages(tmp_path):
    """`sparsam` starts, parses and reports user errors with matplotlib, tqdm and sklearn absent."""
    script = f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('matplotlib', 'tqdm', 'sklearn'):
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
from sparsam.__main__ import main
assert main(['--help']) == 0
rc = main(['train', '--lr', '-1', '--out', {str(tmp_path / "r")!r}])
assert rc == 2, rc
assert not any(m.split('.')[0] in ('matplotlib', 'tqdm', 'sklearn') for m in sys.modules)
print('ok')
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ok" in proc.stdout and "--lr must be > 0" in proc.stderr and "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------------------ resume via the CLI
def test_cli_resume_uses_the_saved_config(tmp_path, capsys):
    pytest.importorskip("sklearn")
    out = tmp_path / "r"
    common = ["--train-subset", "256", "--test-subset", "90", "--batch-size", "64", "--threads", "1", "--no-progress"]
    assert main(["train", *common, "--epochs", "3", "--stop-after", "1", "--opt", "sam", "--out", str(out)]) == 0
    assert len(metrics(out)) == 1
    assert main(["train", "--resume", str(out)]) == 0  # nothing else needed: the saved config is used
    assert [r["epoch"] for r in metrics(out)] == [1, 2, 3]  # --stop-after applied to the first invocation only
    rc = main(["train", "--resume", str(out / "checkpoint.pt"), "--lr", "0.3"])
    err = capsys.readouterr().err
    assert rc == 2 and "--lr: saved 0.05, now 0.3" in err


# ------------------------------------------------------------------------------------------ report
@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    pytest.importorskip("sklearn")
    from sparsam.train import train

    root = tmp_path_factory.mktemp("report")
    for name, over in (("sgd", {"opt": "sgd"}), ("ssam", {"opt": "ssam", "mask": "random", "rho": 0.5})):
        train(build_config([("t", {**TINY, "epochs": 2, "out": str(root / name), **over})]), quiet=True)
    return root


def test_report_table_csv_and_plots(two_runs, capsys):
    pytest.importorskip("matplotlib")
    assert main(["report", str(two_runs / "sgd"), str(two_runs / "ssam"), "--out", str(two_runs / "rep")]) == 0
    table = capsys.readouterr().out
    assert "| Method | Sparsity |" in table and "| SGD |" in table and "| SSAM-R | 0.5 |" in table
    rows = list(csv.DictReader((two_runs / "rep" / "report.csv").open()))
    assert [r["method"] for r in rows] == ["SGD", "SSAM-R"]
    sgd = rows[0]
    final = metrics(two_runs / "sgd")[-1]["test_acc"]
    assert float(sgd["final_acc_mean_pct"]) == pytest.approx(100 * final) and sgd["seeds"] == "1"  # percent
    assert float(sgd["time_ratio_vs_sgd"]) == 1.0 and float(rows[1]["time_ratio_vs_sgd"]) > 0
    for png in ("acc_vs_epoch.png", "acc_vs_time.png"):
        assert (two_runs / "rep" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Final acc (%)" in (two_runs / "rep" / "report.md").read_text()
    assert "SGD and SAM in every panel" in (two_runs / "rep" / "report.md").read_text()


def test_report_mean_and_std_over_seeds(tmp_path):
    from sparsam.runs.tables import summarize, to_markdown
    from sparsam.runs.rundir import RunRecord

    def record(seed, accs, times):
        cfg = {**TrainConfig(opt="sam", epochs=3).to_dict(), "seed": seed}
        rows = [
            {"epoch": i + 1, "test_acc": a, "epoch_time_s": t, "time_s": sum(times[: i + 1])}
            for i, (a, t) in enumerate(zip(accs, times))
        ]
        return RunRecord(tmp_path / str(seed), cfg, {}, rows, {"finished": True})

    varying, rows = summarize([record(0, [0.5, 0.9, 0.8], [1, 2, 3]), record(1, [0.6, 0.7, 0.6], [2, 2, 2])])
    assert varying == [] and len(rows) == 1
    r = rows[0]
    assert r["seeds"] == 2
    assert r["final_mean"] == pytest.approx(0.7) and r["final_std"] == pytest.approx(0.1414213562)
    assert r["best_mean"] == pytest.approx(0.8) and r["epoch_time_s"] == pytest.approx(2.0)
    # one precision rule: accuracy in % with two decimals, a measured time to three significant digits
    assert "| SAM | — | 2 | 70.00 ± 14.14 | 80.00 ± 14.14 | 3/3 | 2.00 | — |" in to_markdown(varying, rows)


def test_report_without_runs_is_a_clear_error(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "no run directories" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ sweep and demo
def test_sweep_skips_finished_and_resumes_unfinished(tmp_path, capsys):
    pytest.importorskip("sklearn")
    root = tmp_path / "sweep"
    argv = [
        "sweep",
        "--root",
        str(root),
        "--methods",
        "sgd,ssam-r",
        "--sparsities",
        "0.5,0.9",
        "--seeds",
        "0",
        "--train-subset",
        "256",
        "--test-subset",
        "90",
        "--batch-size",
        "64",
        "--epochs",
        "2",
        "--threads",
        "1",
        "--no-progress",
        "--no-report",
    ]
    # a time-limited slot: every run stops after one epoch
    assert main([*argv, "--stop-after", "1"]) == 0
    assert len(metrics(root / "sgd-seed0")) == 1 and not (root / "ssam-r-s0.5-seed0").exists()
    assert main([*argv, "--stop-after", "1"]) == 0  # resumes sgd (finishes it), starts ssam-r s=0.5
    assert len(metrics(root / "sgd-seed0")) == 2 and len(metrics(root / "ssam-r-s0.5-seed0")) == 1
    capsys.readouterr()
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "sgd-seed0: finished, skipped" in err and "ssam-r-s0.5-seed0: resuming" in err
    for name in ("sgd-seed0", "ssam-r-s0.5-seed0", "ssam-r-s0.9-seed0"):
        assert json.loads((root / name / "summary.json").read_text())["finished"]
    cfg = json.loads((root / "ssam-r-s0.9-seed0" / "config.json").read_text())["config"]
    assert (cfg["opt"], cfg["mask"], cfg["sparsity"], cfg["seed"], cfg["epochs"]) == ("ssam", "random", 0.9, 0, 2)


def test_sweep_grid_file_and_family(tmp_path, capsys):
    grid = tmp_path / "grid.json"
    grid.write_text(
        json.dumps(
            {
                "methods": ["sgd", "ssam-f"],
                "sparsities": [0.9],
                "seeds": [0, 1],
                "family": "cifar10-resnet18",
                "train": {"epochs": 3},
            }
        )
    )
    assert main(["sweep", "--root", str(tmp_path / "s"), "--grid", str(grid), "--dry-run"]) == 0
    out = capsys.readouterr().out.split()
    assert out == [
        "empty",
        "sgd-seed0",
        "empty",
        "sgd-seed1",
        "empty",
        "ssam-f-s0.9-seed0",
        "empty",
        "ssam-f-s0.9-seed1",
    ]
    from sparsam.cli.sweep import plan

    runs = plan(str(tmp_path / "s"), ["sgd", "ssam-f"], [0.9], [0], [("t", {"epochs": 3})], "cifar10-resnet18")
    assert [(r.config.weight_decay, r.config.epochs, r.config.model) for r in runs] == [
        (5e-4, 3, "resnet18"),
        (1e-3, 3, "resnet18"),
    ]
    assert main(["sweep", "--root", str(tmp_path / "s"), "--methods", "sgd,adam"]) == 2
    assert "unknown method 'adam'" in capsys.readouterr().err


def test_report_time_to_reach_sgds_final_accuracy(tmp_path):
    from sparsam.runs.tables import summarize, to_markdown
    from sparsam.runs.rundir import RunRecord

    def record(opt, seed, accs, times):
        cfg = {**TrainConfig(opt=opt, epochs=len(accs)).to_dict(), "seed": seed}
        rows = [
            {"epoch": i + 1, "test_acc": a, "epoch_time_s": t, "time_s": float(sum(times[: i + 1]))}
            for i, (a, t) in enumerate(zip(accs, times))
        ]
        return RunRecord(tmp_path / f"{opt}{seed}", cfg, {}, rows, {"finished": True})

    # SGD's mean final accuracy is 0.7; SAM seed 0 reaches it at epoch 2 (3 s of training),
    # seed 1 at epoch 3 (9 s); SSAM never does.
    runs = [
        record("sgd", 0, [0.5, 0.6, 0.7], [1, 1, 1]),
        record("sgd", 1, [0.5, 0.7, 0.7], [1, 1, 1]),
        record("sam", 0, [0.6, 0.8, 0.9], [1, 2, 3]),
        record("sam", 1, [0.4, 0.6, 0.75], [3, 3, 3]),
        record("ssam", 0, [0.1, 0.2, 0.3], [2, 2, 2]),
    ]
    varying, rows = summarize(runs)
    by = {r["method"]: r for r in rows}
    assert by["SGD"]["to_sgd_s"] == pytest.approx(2.5)  # seed 0 at 3 s, seed 1 at 2 s
    assert by["SAM"]["to_sgd_s"] == pytest.approx(6.0) and by["SAM"]["to_sgd_runs"] == 2
    assert by["SSAM-F"]["to_sgd_s"] is None and by["SSAM-F"]["to_sgd_runs"] == 0
    table = to_markdown(varying, rows)
    assert "To SGD acc (s)" in table and "not reached" in table
