"""benchmarks/soak.py on a tiny run: it trains, samples memory per epoch and per N steps, stops on time or epochs,
and prints a JSON report with a verdict. (The real soak is ``python benchmarks/soak.py --minutes 30``.)"""
import json
import os

import pytest


@pytest.fixture
def tiny(kit, tmp_path):
    root = kit.write_fashion_mnist(str(tmp_path / "fmnist"), n_train=48, n_test=8)
    return kit.TINY_MODEL + ["DATASET.ROOT", root, "TRAIN.BATCH_SIZE_PER_GPU", "4", "TEST.BATCH_SIZE_PER_GPU", "8",
                             "TRAIN.PRETRAIN_STEPS", "6", "OUTPUT_DIR", str(tmp_path / "o"), "LOG_DIR",
                             str(tmp_path / "l")]


def soak(kit, tmp_path, args, name, capsys):
    """Runs benchmarks/soak.py's main in this process; returns its report."""
    report = str(tmp_path / f"{name}.json")
    tool = kit.load_tool(os.path.join("..", "benchmarks", "soak"))
    assert tool.main(["--threads", "1", "--out", report] + args) == 0
    output = capsys.readouterr().out
    with open(report) as fh:
        data = json.load(fh)
    assert json.loads(output[output.rindex("\n{") + 1:]) == data  # the same JSON closes the output
    return data


def test_soak_by_epochs_samples_every_epoch_and_every_n_steps(kit, tmp_path, tiny, capsys):
    data = soak(kit, tmp_path, ["--epochs", "3", "--sample-every", "2"] + tiny, "epochs", capsys)
    assert data["stopped_by"] == "epochs" and data["epochs_completed"] == 3 and data["steps"] == 3 * 12
    assert [(e["event"], e["epoch"]) for e in data["per_epoch"]] == [
        (kind, epoch) for epoch in range(3) for kind in ("epoch_start", "epoch_end")]
    assert [s["step"] for s in data["per_steps"]] == list(range(2, 37, 2))
    for s in data["per_steps"] + data["per_epoch"]:
        assert s["rss_mb"] > 0 and s["peak_rss_mb"] >= s["rss_mb"] and s["open_files"] > 0
    summary = data["summary"]
    assert summary["verdict"] in ("stable", "growing") and summary["samples_after_warm_up"] == 12
    assert {"rss_growth_mb", "rss_slope_mb_per_1000_steps", "open_files_start", "threads_end"} <= set(summary)


def test_soak_by_time_stops_and_is_inconclusive_when_short(kit, tmp_path, tiny, capsys):
    data = soak(kit, tmp_path, ["--minutes", "0.0001", "--sample-every", "50"] + tiny, "time", capsys)
    assert data["stopped_by"] == "time" and data["steps"] == 1 and data["epochs_completed"] == 0
    assert data["summary"]["verdict"] == "inconclusive"
