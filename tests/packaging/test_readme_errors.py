"""The error messages that README.md shows are the ones the tools print today (produced here, compared whole)."""
import os
import re
import subprocess
import sys

from helpers.kit import REPO, call_tool, restore_process_state, write_fashion_mnist  # noqa: F401 (autouse fixture)


def readme_errors():
    """Every line of README.md that starts with ``error: `` inside a code block."""
    with open(os.path.join(REPO, "README.md")) as fh:
        text = fh.read()
    blocks = re.findall(r"```\n(.*?)```", text, flags=re.S)
    return [line for block in blocks for line in block.splitlines() if line.startswith("error: ")]


def shown(start):
    (line,) = [line for line in readme_errors() if line.startswith(start)]
    return line


def test_unknown_key_message_is_the_readme_example(capsys):
    cfg = os.path.join(REPO, "experiments", "fashion_mnist", "cls_mdeq_quick.yaml")
    assert call_tool("cls_train", ["--cfg", cfg, "DEQ.F_THRESS", "20"]) == 2
    assert capsys.readouterr().err.strip() == shown("error: command line: unknown config key")


def test_refusal_to_overwrite_another_run_is_the_readme_example(tmp_path, capsys, monkeypatch):
    root = write_fashion_mnist(str(tmp_path / "fmnist"), n_train=16, n_test=4)
    folder = tmp_path / "output" / "fashion_mnist" / "cls_mdeq_quick"
    folder.mkdir(parents=True)
    for name in ("checkpoint.pth.tar", "model_best.pth.tar", "final_state.pth.tar"):
        (folder / name).write_bytes(b"an earlier run")
    monkeypatch.chdir(tmp_path)
    cfg = os.path.join(REPO, "experiments", "fashion_mnist", "cls_mdeq_quick.yaml")
    argv = ["--cfg", cfg, "DATASET.ROOT", root, "OUTPUT_DIR", "output/", "LOG_DIR", "log/", "MODEL.CHANNELS_LAST",
            "false", "TRAIN.BATCH_SIZE_PER_GPU", "4"]
    assert call_tool("cls_train", argv) == 2
    assert capsys.readouterr().err.strip() == shown("error: the output folder output/fashion_mnist")
    assert (folder / "final_state.pth.tar").read_bytes() == b"an earlier run"  # nothing of that run is lost


def test_a_python_without_the_package_gets_the_readme_line():
    # -S and no PYTHONPATH: no site-packages, so neither this package nor torch can be imported
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-S", os.path.join("tools", "cls_train.py"), "--cfg", "x.yaml"], cwd=REPO,
                          capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    expected = shown("error: mdeq is not installed for").replace("/usr/bin/python3", sys.executable)
    assert done.stderr.strip() == expected
