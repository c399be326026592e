"""A normal (non-editable) install works without this checkout: every sub-package of lib/, the tools as modules
and console scripts run from another folder, the shipped experiment files are found by name; the requirement
lists agree; the tools/ scripts explain in one line how to install when the package is missing."""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """``pip install --target`` of this checkout (no dependencies: they are in the running environment)."""
    base = tmp_path_factory.mktemp("install")
    target = base / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-q",
                    "--target", str(target), ROOT], check=True, cwd=str(base), timeout=300)
    elsewhere = base / "elsewhere"  # a working directory with no experiments/ or tools/ in it
    elsewhere.mkdir()
    env = dict(os.environ, PYTHONPATH=str(target), OMP_NUM_THREADS="1")
    env.pop("MDEQ_TRACEBACK", None)
    return {"target": str(target), "cwd": str(elsewhere), "env": env}


def _run(installed, args, timeout=240):
    proc = subprocess.run(args, cwd=installed["cwd"], env=installed["env"], capture_output=True, text=True,
                          timeout=timeout)
    return proc.returncode, proc.stdout, proc.stderr


def _lib_packages():
    found = sorted(os.path.relpath(d, os.path.join(ROOT, "lib")).replace(os.sep, ".")
                   for d, _, files in os.walk(os.path.join(ROOT, "lib"))
                   if "__init__.py" in files and "__pycache__" not in d)
    return ["mdeq" + ("" if e == "." else "." + e) for e in found]


def test_normal_install_has_every_subpackage(installed):
    modules = _lib_packages()
    assert {"mdeq", "mdeq.config", "mdeq.models", "mdeq.modules.solvers", "mdeq.core", "mdeq.datasets",
            "mdeq.utils", "mdeq.tools"} <= set(modules)
    code = ("import importlib, sys; mods = [importlib.import_module(m) for m in sys.argv[2:]]; "
            "print(all(m.__file__.startswith(sys.argv[1]) for m in mods))")
    code_, out, err = _run(installed, [sys.executable, "-c", code, installed["target"]] + modules)
    assert code_ == 0, err
    assert out.strip() == "True"


def test_every_experiment_file_is_shipped(installed):
    def yamls(folder):
        return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, files in os.walk(folder)
                      for f in files if f.endswith(".yaml"))

    shipped = yamls(os.path.join(installed["target"], "mdeq", "experiments"))
    assert shipped == yamls(os.path.join(ROOT, "experiments")) and len(shipped) >= 13


def test_module_and_console_script_run_from_another_folder(installed):
    code, out, err = _run(installed, [sys.executable, "-m", "mdeq.tools.cls_valid", "--help"])
    assert code == 0, err
    assert "--cfg" in out and "--testModel" in out
    for script in ("mdeq-cls-train", "mdeq-cls-valid", "mdeq-seg-train", "mdeq-seg-test"):
        path = os.path.join(installed["target"], "bin", script)
        code, out, err = _run(installed, [path, "--help"])
        assert code == 0, (script, err)
        assert "--cfg" in out
    code, out, err = _run(installed, [os.path.join(installed["target"], "bin", "mdeq-download"), "--list"])
    assert code == 0, err
    assert "MDEQ_XL_Seg" in out


def test_shipped_experiment_is_found_by_name(installed):
    code = ("import sys; from mdeq.tools._common import resolve_cfg; "
            "print('\\n'.join(resolve_cfg(a) for a in sys.argv[1:]))")
    names = ["cifar/cls_mdeq_TINY.yaml", "experiments/cifar/cls_mdeq_TINY.yaml", "cifar/nope.yaml"]
    rc, out, err = _run(installed, [sys.executable, "-c", code] + names)
    assert rc == 0, err
    first, second, missing = out.strip().splitlines()
    expected = os.path.join(installed["target"], "mdeq", "experiments", "cifar", "cls_mdeq_TINY.yaml")
    assert first == second == expected
    assert missing == "cifar/nope.yaml"  # left for the loader to report

    # The tool loads the shipped file: the misspelled override is reported, not a missing file.
    rc, out, err = _run(installed, [sys.executable, "-m", "mdeq.tools.cls_train", "--cfg",
                                    "fashion_mnist/cls_mdeq_quick.yaml", "DEQ.F_THRESS", "3"])
    assert rc == 2 and "Traceback" not in err
    assert "unknown config key DEQ.F_THRESS" in err


def test_a_path_that_exists_wins_over_a_shipped_name(tmp_path):
    from mdeq.tools._common import resolve_cfg, resolve_cfg_argv

    local = tmp_path / "cifar" / "cls_mdeq_TINY.yaml"
    local.parent.mkdir()
    local.write_text("GPUS: [0]\n")
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert resolve_cfg("cifar/cls_mdeq_TINY.yaml") == "cifar/cls_mdeq_TINY.yaml"
        shipped = resolve_cfg("imagenet/cls_mdeq_SMALL.yaml")
        assert os.path.isfile(shipped) and shipped.endswith(os.path.join("imagenet", "cls_mdeq_SMALL.yaml"))
        argv = resolve_cfg_argv(["--cfg=imagenet/cls_mdeq_SMALL.yaml", "TRAIN.LR", "0.1"])
        assert argv == ["--cfg=" + shipped, "TRAIN.LR", "0.1"]
    finally:
        os.chdir(cwd)


@pytest.mark.parametrize("tool", ["cls_train", "cls_valid", "seg_train", "seg_test"])
def test_tool_without_the_package_says_how_to_install_in_one_line(tool, tmp_path):
    # -S: no site-packages, so neither mdeq nor torch can be imported (as with a bare system python3)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-S", os.path.join(ROOT, "tools", tool + ".py"), "--cfg", "x.yaml"],
                          cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stdout == "" and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: mdeq is not installed") and "bash scripts/setup.sh" in proc.stderr
    if tool == "cls_train":  # the README shows this message as printed by the system python3
        with open(os.path.join(ROOT, "README.md")) as fh:
            readme = fh.read()
        assert proc.stderr.replace(sys.executable, "/usr/bin/python3") in readme


def _requirement_names(lines):
    return sorted({re.split(r"[<>=!~\[; ]", line.strip(), maxsplit=1)[0].lower() for line in lines
                   if line.strip() and not line.strip().startswith(("#", "-"))})


def test_requirements_txt_matches_pyproject():
    try:
        import tomllib
    except ImportError:  # Python < 3.11: pip carries the same parser
        from pip._vendor import tomli as tomllib
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as fh:
        project = tomllib.load(fh)["project"]
    with open(os.path.join(ROOT, "requirements.txt")) as fh:
        listed = [line for line in fh]
    declared = list(project["dependencies"]) + project["optional-dependencies"]["all"] + \
        project["optional-dependencies"]["test"]
    assert _requirement_names(listed) == _requirement_names(declared)
    pins = {re.split(r"[<>=!~]", r, maxsplit=1)[0].lower(): r.replace(" ", "") for r in declared}
    for line in listed:  # same version bounds as pyproject
        line = line.strip()
        if line and not line.startswith("#"):
            assert pins[re.split(r"[<>=!~]", line, maxsplit=1)[0].lower()] == line
    assert "scipy" not in _requirement_names(declared)
    for folder in ("lib", "tools", "tests", "benchmarks"):  # and nothing imports it
        for d, _, files in os.walk(os.path.join(ROOT, folder)):
            for name in files:
                if name.endswith(".py"):
                    with open(os.path.join(d, name)) as fh:
                        assert not re.search(r"^\s*(import|from)\s+scipy\b", fh.read(), re.M), name
    assert "pyyaml" in _requirement_names(project["dependencies"])
    assert project["name"] != "mdeq"  # the public index's `mdeq` is another project
