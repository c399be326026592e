"""Reading metrics.csv files and plotting runs: empty columns, single-row runs, labels, the PNG, the tool."""
from __future__ import annotations

import os
import struct
import subprocess
import sys
from typing import Dict, List, Sequence

import pytest

from mdeq.utils.plotting import (METRICS_COLUMNS, default_labels, find_metrics, plot_runs, read_metrics,
                                 run_panels, time_unit, valid_metric)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(ROOT, "tools", "plot_runs.py")


def write_metrics(folder: str, rows: Sequence[Dict[str, object]], columns: Sequence[str] = METRICS_COLUMNS,
                  tail: str = "") -> str:
    """Writes a metrics.csv with the given rows (missing cells empty) and returns the folder."""
    os.makedirs(folder, exist_ok=True)
    lines = [",".join(columns)]
    for row in rows:
        lines.append(",".join("" if row.get(c) is None else str(row[c]) for c in columns))
    with open(os.path.join(folder, "metrics.csv"), "w") as fh:
        fh.write("\n".join(lines) + "\n" + tail)
    return folder


def cls_rows() -> List[Dict[str, object]]:
    """Two unrolled epochs (no solver columns), then two equilibrium epochs."""
    rows: List[Dict[str, object]] = []
    for epoch in (1, 2, 3, 4):
        eq = epoch > 2
        rows.append(dict(epoch=epoch, phase="equilibrium" if eq else "unrolled", step=100 * epoch,
                         seconds=30.0 * epoch, lr=0.001, train_loss=1.0 / epoch, train_top1=50 + epoch,
                         valid_loss=1.2 / epoch, valid_top1=60.0 + 5 * epoch, valid_top5=99.0,
                         forward_nstep=10.0 + epoch if eq else None, backward_nstep=12.0 + epoch if eq else None,
                         forward_abs_res=1e-4 if eq else None, valid_forward_nstep=20.0 if eq else None,
                         f_calls_forward=1000 * epoch, f_calls_backward=900 * epoch))
    return rows


def png_size(path: str) -> tuple:
    with open(path, "rb") as fh:
        head = fh.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG file"
    return struct.unpack(">II", head[16:24])


# ---------------------------------------------------------------------------------------------------- reading
def test_read_metrics_parses_numbers_empty_cells_and_text(tmp_path) -> None:
    run = write_metrics(str(tmp_path / "run"), cls_rows())
    m = read_metrics(run)
    assert m["epoch"] == [1.0, 2.0, 3.0, 4.0]
    assert m["phase"] == ["unrolled", "unrolled", "equilibrium", "equilibrium"]
    assert m["forward_nstep"] == [None, None, 13.0, 14.0]
    assert m["valid_mIoU"] == [None] * 4
    assert m["f_calls_backward"] == [900.0, 1800.0, 2700.0, 3600.0]


def test_a_row_being_written_and_missing_columns_are_tolerated(tmp_path) -> None:
    columns = ("epoch", "seconds", "valid_top1")  # an older or shorter file
    run = write_metrics(str(tmp_path / "run"), [dict(epoch=1, seconds=5.0, valid_top1=70.0)], columns,
                        tail="2,10.0,7")  # the next row, half written
    m = read_metrics(os.path.join(run, "metrics.csv"))
    assert m["epoch"] == [1.0] and m["valid_top1"] == [70.0]
    assert m["train_loss"] == [None] and m["phase"] == [""]


def test_a_file_without_header_is_refused(tmp_path) -> None:
    path = tmp_path / "metrics.csv"
    path.write_text("1,2,3\n")
    with pytest.raises(ValueError, match="no header line with an 'epoch' column"):
        read_metrics(str(path))


def test_a_folder_without_metrics_names_the_runs_below_it(tmp_path) -> None:
    write_metrics(str(tmp_path / "output" / "cifar10" / "tiny"), cls_rows())
    with pytest.raises(FileNotFoundError, match=r"no metrics.csv in .*output; .*found below it: .*cifar10/tiny"):
        find_metrics(str(tmp_path / "output"))
    with pytest.raises(FileNotFoundError, match=r"does not exist; pass a run folder"):
        find_metrics(str(tmp_path / "nowhere"))


def test_default_labels_are_folder_names_made_unique(tmp_path) -> None:
    a = write_metrics(str(tmp_path / "a" / "cifar10" / "tiny"), cls_rows())
    b = write_metrics(str(tmp_path / "b" / "cifar10" / "tiny"), cls_rows())
    c = write_metrics(str(tmp_path / "b" / "cifar10" / "large"), cls_rows())
    assert default_labels([a]) == ["tiny"]
    assert default_labels([a, c]) == ["tiny", "large"]
    assert default_labels([a, b, c]) == ["a/cifar10/tiny", "b/cifar10/tiny", "large"]


# ---------------------------------------------------------------------------------------------------- panels
def lines_of(panel) -> Dict[str, tuple]:
    """Curves by label and line style (solid "-", dashed "--", dotted ":")."""
    return {(line.label, line.style): (list(line.x), list(line.y)) for line in panel.lines}


def test_panels_hold_the_right_points(tmp_path) -> None:
    m = read_metrics(write_metrics(str(tmp_path / "run"), cls_rows()))
    by_epoch, by_time, loss, nstep = run_panels([m], ["r"])
    assert lines_of(by_epoch)["r", "-"] == ([1.0, 2.0, 3.0, 4.0], [65.0, 70.0, 75.0, 80.0])
    assert lines_of(by_time)["r", "-"] == ([30.0, 60.0, 90.0, 120.0], [65.0, 70.0, 75.0, 80.0])  # s up to 5 min
    assert lines_of(loss)["r", "-"] == ([1.0, 2.0, 3.0, 4.0], [1.0, 0.5, 1 / 3, 0.25])
    assert lines_of(loss)["r", "--"] == ([1.0, 2.0, 3.0, 4.0], [1.2, 0.6, 1.2 / 3, 0.3])
    assert lines_of(nstep)["r", "-"] == ([3.0, 4.0], [13.0, 14.0])  # unrolled epochs have no solver stats
    assert lines_of(nstep)["r", "--"] == ([3.0, 4.0], [15.0, 16.0])
    assert lines_of(nstep)["r", ":"] == ([3.0, 4.0], [20.0, 20.0])
    assert "top-1 accuracy" in by_epoch.ylabel and by_time.xlabel == "training seconds"
    assert [line.legend for line in nstep.lines] == [True, False, False], "one legend entry per run"


def test_a_run_without_solver_columns_gets_its_legend_entry_on_its_first_curve_with_points(tmp_path) -> None:
    a = read_metrics(write_metrics(str(tmp_path / "a"), cls_rows()[:1]))  # unrolled only
    b = read_metrics(write_metrics(str(tmp_path / "b"), cls_rows()))
    nstep = run_panels([a, b], ["a", "b"])[3]
    assert [(line.label, line.legend) for line in nstep.lines if line.legend] == [("b", True)]


def test_segmentation_runs_plot_miou_and_long_runs_use_minutes(tmp_path) -> None:
    rows = [dict(epoch=e, seconds=400.0 * e, train_loss=0.5, valid_mIoU=0.5 + 0.1 * e, valid_pixel_acc=0.9)
            for e in (1, 2)]
    m = read_metrics(write_metrics(str(tmp_path / "seg"), rows))
    assert valid_metric(m) == "valid_mIoU"
    by_epoch, by_time, _, nstep = run_panels([m], ["seg"])
    assert by_epoch.ylabel == "mIoU"
    assert by_time.xlabel == "training minutes"
    assert lines_of(by_time)["seg", "-"][0] == pytest.approx([400 / 60, 800 / 60])
    assert all(not line.x for line in nstep.lines)


def test_time_unit() -> None:
    assert time_unit([10.0, 299.0]) == (1.0, "seconds")
    assert time_unit([301.0]) == (60.0, "minutes")
    assert time_unit([7201.0]) == (3600.0, "hours")
    assert time_unit([]) == (1.0, "seconds")


# ---------------------------------------------------------------------------------------------------- the PNG
def test_plot_runs_writes_a_png_for_several_runs_including_a_single_row_one(tmp_path) -> None:
    a = write_metrics(str(tmp_path / "a"), cls_rows())
    b = write_metrics(str(tmp_path / "b"), cls_rows()[:1])  # one row, unrolled: solver columns all empty
    out = plot_runs([a, os.path.join(b, "metrics.csv")], str(tmp_path / "plots" / "runs.png"), title="t")
    assert os.path.getsize(out) > 1000
    assert png_size(out) == (1200, 840)  # 2 x 2 panels of 6 x 4.2 inches at 100 dpi


def test_plot_runs_checks_the_labels(tmp_path) -> None:
    a = write_metrics(str(tmp_path / "a"), cls_rows())
    with pytest.raises(ValueError, match="2 labels for 1 runs"):
        plot_runs([a], str(tmp_path / "x.png"), labels=["x", "y"])
    with pytest.raises(ValueError, match="no runs given"):
        plot_runs([], str(tmp_path / "x.png"))


# ---------------------------------------------------------------------------------------------------- the tool
def run_tool(args: List[str], env_extra: Dict[str, str] = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, TOOL] + args, capture_output=True, text=True, env=env, timeout=300)


def test_the_tool_writes_metrics_png_into_a_single_run_folder(tmp_path) -> None:
    run = write_metrics(str(tmp_path / "run"), cls_rows())
    done = run_tool([run])
    assert done.returncode == 0, done.stderr
    assert png_size(os.path.join(run, "metrics.png"))[0] > 0
    assert done.stdout.strip() == f"wrote {os.path.join(run, 'metrics.png')}"


def test_the_tool_reports_user_errors_in_one_line(tmp_path) -> None:
    done = run_tool([str(tmp_path / "missing")])
    assert done.returncode == 2
    assert done.stderr.startswith("error: ") and "does not exist" in done.stderr
    assert "Traceback" not in done.stderr


def test_the_tool_says_how_to_install_matplotlib(tmp_path) -> None:
    blocker = tmp_path / "blocked" / "matplotlib"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('matplotlib is not installed')\n")
    path = os.pathsep.join([str(tmp_path / "blocked"), os.environ.get("PYTHONPATH", "")])
    done = run_tool([str(tmp_path)], {"PYTHONPATH": path})
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: plotting needs matplotlib; install it with `pip install matplotlib` (or the package's `plot` extra)"]
