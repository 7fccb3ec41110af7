"""benchmarks/study_time.py reads the regime study's settings from benchmarks/cifar_study.sh, so the
timed configurations are the study's: checked against the script's text and sparsam's config
builder; and one tiny timing round end to end."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

from sparsam.cli.train import build_parser, resolve
from sparsam.train.methods import method_name

_ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("sparsam_bench_study_time", _ROOT / "benchmarks" / "study_time.py")
stt = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = stt
_spec.loader.exec_module(stt)


def test_configurations_are_the_study_scripts(tmp_path):
    common, configs = stt.study_configs(stt.SCRIPT, "DATA_DIR")
    text = stt._regime_block(stt.SCRIPT.read_text())  # the replication and MSAM modes have entries of their own
    variants = re.findall(r'^\s*"([\w.-]+)\|', text, re.M)
    assert len(variants) == 6
    names = [c.name for c in configs]
    assert names == ["sgd", "sam", "ssam-f-s0.5", "ssam-f-s0.9", "ssam-d-s0.5", "ssam-d-s0.9", "ssam-n"] + [
        f"variants/{v}" for v in variants
    ]
    assert common[:2] == ["--data", "DATA_DIR"] and "${EXTRA:-}" not in common and "$DATA" not in common
    assert common[common.index("--width") + 1] == "16" and common[common.index("--weight-decay") + 1] == "5e-4"
    # every configuration builds a valid config of the method its name says, with the study's settings
    expect = {"ssam-f": "ssam-f", "ssam-d": "ssam-d", "ssam-n": "ssam-n", "sgd": "sgd", "sam": "sam"}
    real_data = [*common[:1], str(tmp_path), *common[2:]]  # an existing folder, so the config validates
    for cfg in configs:
        args = build_parser("t").parse_args([*real_data, *cfg.flags, "--out", str(tmp_path / "x")])
        built = resolve(args)
        assert (built.width, built.epochs, built.rho, built.weight_decay) == (16, 20, 0.1, 5e-4)
        main_method = cfg.name.rsplit("-s0.", 1)[0]
        if main_method in expect:
            assert method_name(built) == expect[main_method]
    flags = {c.name: c.flags for c in configs}
    assert flags["variants/looksam-a0.1"] == ("--opt", "looksam", "--look-k", "5", "--look-alpha", "0.1")
    assert flags["ssam-f-s0.9"] == ("--opt=ssam", "--mask=fisher", "--sparsity=0.9")


def test_unclosed_array_is_an_error(tmp_path):
    bad = tmp_path / "s.sh"
    bad.write_text('case x in\nregime)\n  COMMON=(--a "$DATA"\n  ;;\nesac\n')
    with pytest.raises(SystemExit, match="not closed"):
        stt.study_configs(bad, "D")


def test_one_round_end_to_end(tmp_path, capsys):
    data = _ROOT.parent / "shared" / "data" / "cifar10-jpeg"
    if not data.is_dir():
        pytest.skip(f"needs the JPEG copy of CIFAR-10 at {data}")
    out = tmp_path / "t.json"
    stt.main(
        [
            "--data",
            str(data),
            "--rounds",
            "1",
            "--only",
            "every2",
            "--out",
            str(out),
            "--extra",
            "--train-subset 64 --width 2 --batch-size 32 --num-samples 8",
        ]
    )
    rows = json.loads(out.read_text())["configs"]
    assert list(rows) == ["sgd", "variants/sam-every2"]
    assert rows["sgd"]["time_vs_sgd"] == 1.0
    # SAM on every second step: 3 of 2 steps' passes; 64 images at batch 32 = 2 steps -> 3 passes / 2
    assert rows["variants/sam-every2"]["compute_vs_sgd"] == pytest.approx(1.5)
    assert "| variants/sam-every2 | 1.50 |" in capsys.readouterr().out
