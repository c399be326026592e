"""benchmarks/time_to_accuracy.py: the per-recipe CSV and the PNG from metrics.csv files, and the time budget
(SIGTERM at the budget, SIGKILL after the grace period) on a fake training script."""
from __future__ import annotations

import csv
import importlib.util
import os
import struct
import sys
import time
from typing import Dict, List, Sequence

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SPEC = importlib.util.spec_from_file_location("time_to_accuracy",
                                              os.path.join(ROOT, "benchmarks", "time_to_accuracy.py"))
tta = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(tta)

HEADER = ("epoch,phase,step,seconds,lr,train_loss,train_top1,valid_loss,valid_top1,valid_top5,valid_mIoU,"
          "valid_pixel_acc,forward_nstep,forward_abs_res,forward_rel_res,backward_nstep,backward_abs_res,"
          "backward_rel_res,valid_forward_nstep,f_calls_forward,f_calls_backward")

# A stand-in for tools/cls_train.py: takes the same command line, writes one metrics.csv row every FAKE.SLEEP
# seconds (FAKE.ROWS rows, then exits; 0: forever) into OUTPUT_DIR/fake/recipe/, and on SIGTERM either writes
# a marker file and exits (FAKE.ON_TERM exit) or ignores it (FAKE.ON_TERM ignore). FAKE.FAIL 1 exits with 1.
FAKE_TRAIN = r'''
import os, signal, sys, time
argv = sys.argv[1:]
opts = dict(zip(argv[argv.index("--cfg") + 2::2], argv[argv.index("--cfg") + 3::2]))
out = os.path.join(opts["OUTPUT_DIR"], "fake", "recipe")
if opts.get("FAKE.FAIL") == "1":
    sys.exit(1)
os.makedirs(out, exist_ok=True)
def on_term(signum, frame):
    open(os.path.join(opts["OUTPUT_DIR"], "terminated"), "w").close()
    sys.exit(0)
signal.signal(signal.SIGTERM, signal.SIG_IGN if opts.get("FAKE.ON_TERM") == "ignore" else on_term)
rows, pause = int(opts.get("FAKE.ROWS", "0")), float(opts.get("FAKE.SLEEP", "0.2"))
with open(os.path.join(out, "metrics.csv"), "w") as fh:
    fh.write(HEADER + "\n")
    fh.flush()
    epoch = 0
    while rows == 0 or epoch < rows:
        time.sleep(pause)
        epoch += 1
        fh.write(f"{epoch},equilibrium,{10 * epoch},{1.5 * epoch},0.001,0.5,80,0.4,{60 + epoch},99,,,12,1e-4,"
                 f"1e-3,14,1e-6,1e-3,20,{100 * epoch},{70 * epoch}\n")
        fh.flush()
'''.replace("HEADER", repr(HEADER))


def metrics_file(folder: str, rows: Sequence[str]) -> str:
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "metrics.csv")
    with open(path, "w") as fh:
        fh.write(HEADER + "\n" + "".join(r + "\n" for r in rows))
    return path


def row(epoch: int, seconds: float, top1: str, f: int, b: int, phase: str = "equilibrium") -> str:
    cells = {"epoch": str(epoch), "phase": phase, "seconds": str(seconds), "valid_top1": top1,
             "f_calls_forward": str(f), "f_calls_backward": str(b)}
    return ",".join(cells.get(name, "") for name in HEADER.split(","))


def read_csv(path: str) -> List[Dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def png_size(path: str) -> tuple:
    with open(path, "rb") as fh:
        head = fh.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG file"
    return struct.unpack(">II", head[16:24])


@pytest.fixture()
def fake_tool(tmp_path) -> str:
    path = tmp_path / "fake_train.py"
    path.write_text(FAKE_TRAIN)
    return str(path)


@pytest.fixture()
def cfg_file(tmp_path) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text("TRAIN:\n  END_EPOCH: 3\n")
    return str(path)


# ------------------------------------------------------------------------------------------------ CSV and PNG
def test_write_curve_keeps_validated_epochs_with_their_counts(tmp_path) -> None:
    metrics = metrics_file(str(tmp_path / "run"), [
        row(1, 30.5, "60.5", 0, 0, phase="unrolled"),
        row(2, 61.0, "", 0, 0, phase="unrolled"),  # an epoch without validation: no point
        row(3, 95.25, "80.75", 1200, 900),
    ])
    rows = tta.write_curve(metrics, "quick", str(tmp_path / "out" / "quick.csv"))
    assert len(rows) == 2
    written = read_csv(str(tmp_path / "out" / "quick.csv"))
    assert list(written[0]) == list(tta.CSV_COLUMNS)
    assert written == [
        {"label": "quick", "epoch": "1", "seconds": "30.5", "valid_top1": "60.5", "f_calls_forward": "0",
         "f_calls_backward": "0"},
        {"label": "quick", "epoch": "3", "seconds": "95.25", "valid_top1": "80.75", "f_calls_forward": "1200",
         "f_calls_backward": "900"},
    ]


def test_plot_only_draws_every_recipe_and_prints_a_summary_each(tmp_path, capsys) -> None:
    out = str(tmp_path / "out")
    tta.write_curve(metrics_file(str(tmp_path / "a"), [row(1, 30, "70", 100, 90), row(2, 60, "75", 200, 180),
                                                      row(3, 90, "75", 300, 270)]), "a", os.path.join(out, "a.csv"))
    tta.write_curve(metrics_file(str(tmp_path / "b"), [row(1, 20, "72", 50, 40)]), "b", os.path.join(out, "b.csv"))
    (tmp_path / "out" / "notes.csv").write_text("x,y\n1,2\n")  # another CSV: ignored
    assert tta.main(["--out", out, "--plot-only", "--target", "74"]) == 0
    png = os.path.join(out, "time_to_accuracy.png")
    assert os.path.getsize(png) > 1000
    assert png_size(png) == (1800, 420)  # three panels of 6 x 4.2 inches at 100 dpi
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "a: best valid_top1 75.00 at 60.0 s (epoch 2); 3 epochs in 90.0 s; reaches 74 at 60.0 s (epoch 2)"
    assert lines[1] == "b: best valid_top1 72.00 at 20.0 s (epoch 1); 1 epochs in 20.0 s; does not reach 74"
    assert lines[2] == f"wrote {png}"


def test_curves_are_read_back_with_numbers_and_plotted_by_calls(tmp_path) -> None:
    out = str(tmp_path / "out")
    tta.write_curve(metrics_file(str(tmp_path / "a"), [row(1, 30, "70", 100, 90)]), "a", os.path.join(out, "a.csv"))
    curves = tta.read_curves(out)
    assert curves == {"a": [{"label": "a", "epoch": 1.0, "seconds": 30.0, "valid_top1": 70.0,
                             "f_calls_forward": 100.0, "f_calls_backward": 90.0}]}
    assert tta._both_calls(curves["a"][0]) == 190.0


def test_from_metrics_turns_a_finished_run_into_a_recipe_curve(tmp_path, capsys) -> None:
    metrics = metrics_file(str(tmp_path / "run"), [row(1, 26.5, "80.07", 1876, 1876, phase="unrolled"),
                                                   row(2, 55.25, "85.19", 3752, 3752)])
    out = str(tmp_path / "out")
    assert tta.main(["--out", out, "--label", "best", "--from-metrics", metrics]) == 0
    assert [(r["epoch"], r["seconds"], r["valid_top1"]) for r in read_csv(os.path.join(out, "best.csv"))] == \
        [("1", "26.5", "80.07"), ("2", "55.25", "85.19")]
    assert capsys.readouterr().out.splitlines()[0] == \
        "best: best valid_top1 85.19 at 55.2 s (epoch 2); 2 epochs in 55.2 s"
    assert tta.main(["--out", out, "--label", "x", "--from-metrics", str(tmp_path / "missing.csv")]) == 2
    assert "--from-metrics" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tta.parse_args(["--out", out, "--from-metrics", metrics])  # a curve needs a label


def test_plot_only_without_csvs_is_a_clear_error(tmp_path, capsys) -> None:
    assert tta.main(["--out", str(tmp_path), "--plot-only"]) == 2
    assert capsys.readouterr().err.startswith(f"error: no time-to-accuracy CSV in {tmp_path}")


def test_default_label() -> None:
    assert tta.default_label("experiments/fashion_mnist/cls_mdeq_quick.yaml", []) == "cls_mdeq_quick"
    assert tta.default_label("x/tiny.yaml", ["DEQ.F_SOLVER", "anderson", "TRAIN.LR", "0.01"]) == \
        "tiny_F_SOLVER=anderson_LR=0.01"


# ------------------------------------------------------------------------------------------------ the budget
def test_the_run_is_stopped_at_the_budget_and_its_rows_become_the_csv(tmp_path, fake_tool, cfg_file) -> None:
    out = str(tmp_path / "out")
    start = time.monotonic()
    code = tta.main(["--cfg", cfg_file, "--budget-seconds", "2.5", "--out", out, "--label", "fake",
                     "--tool", fake_tool, "FAKE.SLEEP", "0.2"], poll_s=0.05)
    elapsed = time.monotonic() - start
    assert code == 0
    assert 2.5 <= elapsed < 2.5 + 10, elapsed
    assert os.path.exists(os.path.join(out, "runs", "fake", "output", "terminated")), "SIGTERM was not sent"
    rows = read_csv(os.path.join(out, "fake.csv"))
    assert 1 <= len(rows) < 2.5 / 0.2 + 1
    assert [r["epoch"] for r in rows] == [str(i) for i in range(1, len(rows) + 1)]
    assert rows[-1]["f_calls_forward"] == str(100 * len(rows))
    assert png_size(os.path.join(out, "time_to_accuracy.png"))[0] > 0


def test_a_run_that_ignores_sigterm_is_killed_after_the_grace_period(tmp_path, fake_tool, cfg_file) -> None:
    out = str(tmp_path / "out")
    command = [sys.executable, fake_tool, "--cfg", cfg_file, "FAKE.ON_TERM", "ignore", "OUTPUT_DIR", out]
    result = tta.run_with_budget(command, budget_s=1.5, grace_s=1.0, poll_s=0.05)
    assert result["stopped"] and result["killed"]
    assert result["returncode"] == -9
    assert 2.5 <= result["wall_s"] < 2.5 + 10
    assert not os.path.exists(os.path.join(out, "terminated"))


def test_a_run_that_finishes_within_the_budget_is_not_signalled(tmp_path, fake_tool, cfg_file) -> None:
    out = str(tmp_path / "out")
    command = [sys.executable, fake_tool, "--cfg", cfg_file, "FAKE.ROWS", "2", "FAKE.SLEEP", "0.05",
               "OUTPUT_DIR", out]
    result = tta.run_with_budget(command, budget_s=60, grace_s=1.0, poll_s=0.05)
    assert result == {"returncode": 0, "stopped": False, "killed": False, "wall_s": result["wall_s"]}
    assert result["wall_s"] < 30
    assert len(read_csv(tta.newest_metrics(out))) == 2


def test_an_earlier_run_of_the_same_label_is_kept_unless_forced(tmp_path, fake_tool, cfg_file, capsys) -> None:
    out = str(tmp_path / "out")
    argv = ["--cfg", cfg_file, "--out", out, "--label", "r", "--tool", fake_tool, "FAKE.ROWS", "1",
            "FAKE.SLEEP", "0.01"]
    assert tta.main(argv, poll_s=0.05) == 0
    assert tta.main(argv, poll_s=0.05) == 2
    assert "already holds a run of the recipe 'r'; pass another --label, or --force" in capsys.readouterr().err
    assert tta.main(argv[:-6] + ["--force"] + argv[-6:], poll_s=0.05) == 0


def test_a_run_that_fails_before_its_first_validation_is_a_clear_error(tmp_path, fake_tool, cfg_file,
                                                                       capsys) -> None:
    code = tta.main(["--cfg", cfg_file, "--out", str(tmp_path / "out"), "--label", "bad", "--tool", fake_tool,
                     "FAKE.FAIL", "1"], poll_s=0.05)
    assert code == 2
    assert "the training of 'bad' failed (exit code 1) before its first validation" in capsys.readouterr().err
