"""Run files read back and rewritten: every reader checks each file against its schema and names the
first bad line or key in one line (exit 2); every rewrite is atomic; a run stopped at any write of
its first epochs stays resumable and ends as a straight run does."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from sparsam.__main__ import main

pytest.importorskip("sklearn")  # the digits data set

TINY = ["--train-subset", "256", "--test-subset", "90", "--batch-size", "64", "--threads", "1", "--no-progress"]
SRC = str(Path(__file__).resolve().parent.parent / "src")
TIMES = ("epoch_time_s", "eval_time_s", "time_s", "wall_time_s", "samples_per_s")


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    return lines[0]


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def untimed(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMES} for r in rows]


def python(code: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": SRC, "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """A finished two-epoch run, trained without interruption (copy it before changing anything)."""
    out = tmp_path_factory.mktemp("straight") / "run"
    assert main(["train", *TINY, "--epochs", "2", "--out", str(out)]) == 0
    return out


@pytest.fixture
def run_a(straight, tmp_path):
    out = tmp_path / "runA"
    shutil.copytree(straight, out)
    return out


# ------------------------------------------------------------------------------------ metrics.jsonl
def _line(run: Path, n: int) -> str:
    return (run / "metrics.jsonl").read_text().splitlines()[n - 1]


DAMAGED_METRICS = {
    "garbled": (lambda first, second: first + "\n" + second[: len(second) // 2] + "\n", "line 2 is not valid JSON"),
    "no test_acc": (
        lambda first, second: (
            first + "\n" + json.dumps({k: v for k, v in json.loads(second).items() if k != "test_acc"}) + "\n"
        ),
        "line 2 lacks 'test_acc'",
    ),
    "a list": (lambda first, second: first + "\n[1, 2]\n" + second + "\n", "line 2 holds a JSON list"),
    "not utf-8": (
        lambda first, second: first + "\n" + second.replace('"test_acc"', '"test_\udcff"') + "\n",
        "line 2 holds bytes that are not UTF-8",
    ),
    "text for a number": (
        lambda first, second: first + "\n" + second.replace('"test_acc": ', '"test_acc": "high", "x": ') + "\n",
        "line 2: 'test_acc' must be number or null, got str 'high'",
    ),
    "an epoch missing": (lambda first, second: second + "\n", "line 1 records epoch 2 where epoch 1 should follow"),
}


@pytest.mark.parametrize("damage", DAMAGED_METRICS)
def test_report_analyze_and_resume_name_the_first_bad_metrics_line(run_a, tmp_path, capsys, damage):
    make, says = DAMAGED_METRICS[damage]
    text = make(_line(run_a, 1), _line(run_a, 2))
    (run_a / "metrics.jsonl").write_bytes(text.encode("utf-8", errors="surrogateescape"))
    (run_a / "summary.json").unlink()  # so that --resume reads the run rather than finding it finished
    before = snapshot(run_a)
    for argv in (
        ["report", str(run_a), "--out", str(tmp_path / "rep"), "--no-plots"],
        ["analyze", str(run_a), "--out", str(tmp_path / "ana"), "--quiet"],
        ["train", "--resume", str(run_a)],
    ):
        capsys.readouterr()
        assert main(argv) == 2, argv
        line = one_error_line(capsys)
        assert str(run_a / "metrics.jsonl") in line and says in line, (argv, line)
    assert snapshot(run_a) == before
    assert not (tmp_path / "rep").exists() and not (tmp_path / "ana").exists()


def test_a_torn_last_line_without_newline_is_left_out(run_a, tmp_path, capsys):
    """What an append cut short by a crash (earlier versions) leaves: the run still reports."""
    with open(run_a / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 3, "step"')
    assert main(["report", str(run_a), "--out", str(tmp_path / "rep"), "--no-plots"]) == 0
    assert "2/2" in (tmp_path / "rep" / "report.md").read_text()


# --------------------------------------------------------------------- config.json and summary.json
@pytest.mark.parametrize(
    ("key", "value", "says"),
    [
        ("opt", "bogus", "--opt must be one of"),
        ("epochs", "ten", "--epochs (key 'epochs' in"),
        ("sparsity", "half", "--sparsity (key 'sparsity' in"),
        ("colour", "red", "unknown configuration key 'colour'"),
    ],
)
def test_report_analyze_and_resume_refuse_a_bad_setting_in_config_json(run_a, tmp_path, capsys, key, value, says):
    meta = json.loads((run_a / "config.json").read_text())
    meta["config"][key] = value
    (run_a / "config.json").write_text(json.dumps(meta))
    (run_a / "summary.json").unlink()
    before = snapshot(run_a)
    for argv in (
        ["report", str(run_a), "--out", str(tmp_path / "rep"), "--no-plots"],
        ["analyze", str(run_a), "--out", str(tmp_path / "ana"), "--quiet"],
        ["train", "--resume", str(run_a)],
    ):
        capsys.readouterr()
        assert main(argv) == 2, argv
        line = one_error_line(capsys)
        assert str(run_a / "config.json") in line and says in line, (argv, line)
    assert snapshot(run_a) == before


def test_non_utf8_bytes_in_config_json_are_named(run_a, tmp_path, capsys):
    raw = (run_a / "config.json").read_bytes()
    (run_a / "config.json").write_bytes(raw.replace(b'"sgd"', b'"sg\xff"', 1))
    capsys.readouterr()
    assert main(["report", str(run_a), "--out", str(tmp_path / "rep"), "--no-plots"]) == 2
    line = one_error_line(capsys)
    assert str(run_a / "config.json") in line and "not UTF-8" in line


@pytest.mark.parametrize(
    ("content", "says"),
    [("[1]", "holds a JSON list"), ('{"finished": true, "best_epoch": "two"}', "'best_epoch' must be int or null")],
)
def test_a_bad_summary_json_is_named(run_a, tmp_path, capsys, content, says):
    (run_a / "summary.json").write_text(content)
    capsys.readouterr()
    assert main(["report", str(run_a), "--out", str(tmp_path / "rep"), "--no-plots"]) == 2
    line = one_error_line(capsys)
    assert str(run_a / "summary.json") in line and says in line


# ------------------------------------------------------------------------------------- checkpoint entries
@pytest.mark.parametrize(
    ("change", "says"),
    [
        (lambda c: c.pop("global_step"), "lacks global_step"),
        (lambda c: c.__setitem__("epoch", "2"), "'epoch' must be int >= 0, got str '2'"),
        (lambda c: c.__setitem__("partial", {"step_in_epoch": 1}), "'partial' entry 'loss_sum'"),
    ],
)
def test_resume_names_a_bad_checkpoint_entry(run_a, capsys, change, says):
    ckpt = torch.load(run_a / "checkpoint.pt", weights_only=True)
    change(ckpt)
    torch.save(ckpt, run_a / "checkpoint.pt")
    (run_a / "summary.json").unlink()
    before = snapshot(run_a)
    capsys.readouterr()
    assert main(["train", "--resume", str(run_a)]) == 2
    line = one_error_line(capsys)
    assert str(run_a / "checkpoint.pt") in line and says in line
    assert snapshot(run_a) == before


# ----------------------------------------------------------------------------------- where files go
def test_report_and_analyze_out_pointing_at_a_file_is_one_line(run_a, tmp_path, capsys):
    f = tmp_path / "notes.txt"
    f.write_text("keep me")
    for argv in (["report", str(run_a), "--out", str(f)], ["analyze", str(run_a), "--out", str(f), "--quiet"]):
        capsys.readouterr()
        assert main(argv) == 2
        assert "is a file" in one_error_line(capsys)
    assert f.read_text() == "keep me"


def _refuse_writes_in(folder: Path, monkeypatch) -> None:
    """Writes in ``folder`` fail as on a read-only disk (the tests run as root, which ignores modes)."""
    real = os.open

    def guarded(path, flags, *args, **kwargs):
        if Path(os.fsdecode(path)).parent == folder and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise PermissionError(errno.EACCES, "Permission denied", os.fsdecode(path))
        return real(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", guarded)


def test_a_read_only_out_is_one_line_for_train_resume_and_report(run_a, tmp_path, capsys, monkeypatch):
    new, rep = tmp_path / "new", tmp_path / "rep"
    new.mkdir()
    rep.mkdir()
    (run_a / "summary.json").unlink()
    for folder, argv, says in (
        (new, ["train", *TINY, "--epochs", "1", "--out", str(new)], f"cannot write in {new} (Permission denied)"),
        (run_a, ["train", "--resume", str(run_a), "--epochs", "3"], f"cannot write in {run_a} (Permission denied)"),
        (rep, ["report", str(run_a), "--out", str(rep), "--no-plots"], "could not write the report"),
    ):
        with monkeypatch.context() as m:
            _refuse_writes_in(folder, m)
            capsys.readouterr()
            assert main(argv) == 2, argv
            line = one_error_line(capsys)
            assert says in line, line


def test_a_full_disk_before_config_json_is_one_line_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    from sparsam.runs import checkpoint as ck

    real = ck.atomic_write

    def full(path, write):
        if Path(path).name == "config.json":
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, write)

    monkeypatch.setattr(ck, "atomic_write", full)
    out = tmp_path / "r"
    capsys.readouterr()
    assert main(["train", *TINY, "--epochs", "1", "--out", str(out)]) == 2
    line = one_error_line(capsys)
    assert "could not write the run configuration" in line and "the disk is full" in line
    assert not out.exists()  # the run directory it created is removed again
    monkeypatch.undo()
    assert main(["train", *TINY, "--epochs", "1", "--out", str(out)]) == 0


# ----------------------------------------------------------------------------------- atomic rewrite
LIMITED = """
    import resource, sys
    limit = int(sys.argv[1])
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))  # a write past it fails (EFBIG) mid-file
    from sparsam.__main__ import main
    sys.exit(main(sys.argv[2:]))
"""


def test_a_resume_whose_metrics_rewrite_fails_midway_keeps_every_line(tmp_path, capsys):
    """The resume drops a line written after the checkpoint (the old write order); its rewrite of
    metrics.jsonl stops after a few bytes. The file keeps all its lines, and the next resume goes on
    with every epoch."""
    out = tmp_path / "r"
    assert main(["train", *TINY, "--epochs", "4", "--stop-after", "2", "--out", str(out)]) == 0
    two = metrics(out)
    extra = {**two[-1], "epoch": 3, "step": two[-1]["step"] + 4}  # a line beyond the checkpoint
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [*two, extra]))
    before = (out / "metrics.jsonl").read_bytes()
    done = python(LIMITED, "200", "train", "--resume", str(out))
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and "could not write the metrics file" in done.stderr
    assert (out / "metrics.jsonl").read_bytes() == before
    assert main(["train", "--resume", str(out)]) == 0
    rows = metrics(out)
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    assert untimed(rows[:2]) == untimed(two)
    summary = json.loads((out / "summary.json").read_text())
    best = max(rows, key=lambda r: r["test_acc"])
    assert (summary["best_epoch"], summary["best_test_acc"]) == (best["epoch"], best["test_acc"])


KILL_AT_RENAME = """
    import os, signal, sys
    name = sys.argv[1]

    def hook(event, args):  # SIGKILL when a whole new `name` is about to replace the old one
        if event == "os.rename" and os.path.basename(str(args[1])) == name:
            os.kill(os.getpid(), signal.SIGKILL)

    sys.addaudithook(hook)
    from sparsam.__main__ import main
    sys.exit(main(sys.argv[2:]))
"""


def test_sigkill_while_resume_rewrites_metrics_keeps_every_line(tmp_path):
    """SIGKILL while --resume rewrites metrics.jsonl (here at the last moment,
    the new text written in full) leaves the file as it was, and the next resume has every epoch."""
    out = tmp_path / "r"
    assert main(["train", *TINY, "--epochs", "4", "--stop-after", "2", "--out", str(out)]) == 0
    two = metrics(out)
    extra = {**two[-1], "epoch": 3, "step": two[-1]["step"] + 4}  # a line beyond the checkpoint
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [*two, extra]))
    before = (out / "metrics.jsonl").read_bytes()
    killed = python(KILL_AT_RENAME, "metrics.jsonl", "train", "--resume", str(out))
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert (out / "metrics.jsonl").read_bytes() == before
    assert main(["train", "--resume", str(out)]) == 0
    assert [r["epoch"] for r in metrics(out)] == [1, 2, 3, 4]
    assert untimed(metrics(out)[:2]) == untimed(two)


# -------------------------------------------------------------------------------------- write order
KILL_AT = """
    import os, signal, sys
    name, nth = sys.argv[1], int(sys.argv[2])
    seen = [0]

    def hook(event, args):  # SIGKILL when the nth atomic write of `name` opens its temporary file
        if event == "open" and isinstance(args[0], str):
            base = os.path.basename(args[0])
            if base.startswith("." + name + ".") and base.endswith(".tmp"):
                seen[0] += 1
                if seen[0] == nth:
                    os.kill(os.getpid(), signal.SIGKILL)

    sys.addaudithook(hook)
    from sparsam.__main__ import main
    sys.exit(main(sys.argv[3:]))
"""


@pytest.mark.parametrize(
    ("name", "nth"),
    [
        ("config.json", 1),
        ("metrics.jsonl", 1),  # the empty file of a new run
        ("checkpoint.pt", 1),  # the first epoch's checkpoint
        ("metrics.jsonl", 2),  # the first epoch's line
        ("best_model.pt", 1),
        ("checkpoint.pt", 2),
        ("summary.json", 1),
    ],
)
def test_a_kill_at_any_write_leaves_a_run_that_ends_as_a_straight_one(straight, tmp_path, capsys, name, nth):
    out = tmp_path / "r"
    argv = ["train", *TINY, "--epochs", "2", "--out", str(out)]
    killed = python(KILL_AT, name, str(nth), *argv)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    if (out / "config.json").exists():
        assert main(["train", "--resume", str(out)]) == 0
    else:  # stopped before its first file: nothing to resume, and nothing in the way of a new run
        capsys.readouterr()
        assert main(["train", "--resume", str(out)]) == 2
        assert "start the run without --resume" in one_error_line(capsys)
        assert main(argv) == 0
    assert untimed(metrics(out)) == untimed(metrics(straight))
    best, ref = (torch.load(d / "best_model.pt", weights_only=True) for d in (out, straight))
    assert (best["epoch"], best["test_acc"]) == (ref["epoch"], ref["test_acc"])
    assert all(torch.equal(best["model"][k], ref["model"][k]) for k in ref["model"])
    summary, ref_summary = (json.loads((d / "summary.json").read_text()) for d in (out, straight))
    for key in ("final_test_acc", "best_test_acc", "best_epoch", "final_train_loss", "epochs"):
        assert summary[key] == ref_summary[key], key
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


# --------------------------------------------------------------------------- stopped while starting
SLOW_DATA = """
    import sys, time
    import sparsam.train.engine as engine

    def loading(*args, **kwargs):
        print("loading", flush=True)
        time.sleep(240)

    engine.build_data = loading
    from sparsam.__main__ import main
    sys.exit(main(sys.argv[1:]))
"""


def _stop_while_loading(argv: list[str], sig: int) -> tuple[int, str]:
    env = {**os.environ, "PYTHONPATH": SRC, "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(SLOW_DATA), *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout.readline().strip() == "loading"
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, err


def test_sigterm_while_loading_data_leaves_nothing(tmp_path):
    out = tmp_path / "r"
    rc, err = _stop_while_loading(["train", *TINY, "--epochs", "1", "--out", str(out)], signal.SIGTERM)
    assert rc == 130 and "aborted" in err and "Traceback" not in err, err
    assert not out.exists()
    assert main(["train", *TINY, "--epochs", "1", "--out", str(out)]) == 0


def test_sigkill_while_loading_data_leaves_a_folder_a_new_run_may_use(tmp_path, capsys):
    out = tmp_path / "r"
    argv = ["train", *TINY, "--epochs", "1", "--out", str(out)]
    rc, _ = _stop_while_loading(argv, signal.SIGKILL)
    assert rc == -signal.SIGKILL
    capsys.readouterr()
    assert main(["train", "--resume", str(out)]) == 2
    assert "start the run without --resume" in one_error_line(capsys)
    assert main(argv) == 0  # no --overwrite needed: nothing was written


# ----------------------------------------------------------------------------------- absent classes
def test_a_subset_without_some_classes_warns_naming_them():
    from sparsam.train.loaders import choose_subset

    labels = [c for c in range(10) for _ in range(20)]
    with pytest.warns(UserWarning, match=r"--train-subset 5 holds no image of 5 of the 10 classes"):
        picked = choose_subset(labels, 5, "balanced", 0, what="train")
    assert len({labels[i] for i in picked}) == 5
    with pytest.warns(UserWarning, match=r"--test-subset 3 holds no image of 7 of the 10 classes"):
        choose_subset(labels, 3, "random", 0, what="test")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(choose_subset(labels, 10, "balanced", 0, what="train")) == 10


def test_the_cli_says_which_classes_a_tiny_train_subset_leaves_out(tmp_path):
    args = ["--train-subset", "5", "--batch-size", "5", "--test-subset", "90", "--threads", "1", "--no-progress"]
    code = "import sys\nfrom sparsam.__main__ import main\nsys.exit(main(sys.argv[1:]))"
    done = python(code, "train", *args, "--epochs", "1", "--out", str(tmp_path / "r"))
    assert done.returncode == 0, done.stderr
    lines = [ln for ln in done.stderr.splitlines() if "warning" in ln]
    assert lines == [
        "sparsam train: warning: --train-subset 5 holds no image of 5 of the 10 classes (class 0, 1, 5, 8, 9): "
        "the model trains without them; use --train-subset 10 or more"
    ]


# ----------------------------------------------------------------------------------- Ctrl-C at once
def test_import_sparsam_loads_no_torch():
    """The package loads its names on first use, so the command's own Ctrl-C handling starts before
    the seconds of importing torch."""
    code = "import sys, sparsam\nprint('torch' in sys.modules, sparsam.SAM.__name__, 'torch' in sys.modules)"
    done = python(code)
    assert done.stdout.split() == ["False", "SAM", "True"], done.stderr


CTRL_C = """
    import sys
    import time
    import sparsam.__main__ as cli

    noting = cli._note_ctrl_c

    def ready(interrupted):  # the command has taken over Ctrl-C: from here on, any moment must be clean
        restore = noting(interrupted)
        print("ready", flush=True)
        if HOLD:  # the signal comes while the handler is just installed (before the command's body)
            time.sleep(HOLD)
        return restore

    cli._note_ctrl_c = ready
    sys.exit(cli.main(["report", "/no/such/run"]))
"""


@pytest.mark.parametrize("delay, hold", [(0.0, 0.0), (0.3, 0.0), (1.0, 0.0), (0.0, 5.0)])
def test_ctrl_c_in_the_first_seconds_of_a_command_is_one_line(delay, hold):
    import time

    env = {**os.environ, "PYTHONPATH": SRC, "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", f"HOLD = {hold}\n" + textwrap.dedent(CTRL_C)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # as from a terminal
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert "Traceback" not in err, err
    if proc.returncode == 2:  # the command was done before the signal came
        assert "no such directory" in err
    else:
        assert proc.returncode == 130 and err.strip().splitlines() == ["sparsam report: aborted"], err
