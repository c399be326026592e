"""A normal (non-editable) install contains every sub-package of lib/ and imports without this checkout."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_normal_install_has_every_subpackage(tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-q",
                    "--target", str(target), ROOT], check=True, cwd=str(tmp_path), timeout=300)
    expected = sorted(os.path.relpath(d, os.path.join(ROOT, "lib")).replace(os.sep, ".")
                      for d, _, files in os.walk(os.path.join(ROOT, "lib"))
                      if "__init__.py" in files and "__pycache__" not in d)
    modules = ["mdeq" + ("" if e == "." else "." + e) for e in expected]
    code = ("import importlib, sys; sys.path.insert(0, sys.argv[1]); "
            "mods = [importlib.import_module(m) for m in sys.argv[2:]]; "
            "print(all(m.__file__.startswith(sys.argv[1]) for m in mods))")
    env = dict(os.environ, PYTHONPATH="")
    out = subprocess.run([sys.executable, "-c", code, str(target)] + modules, capture_output=True, text=True,
                         cwd=str(tmp_path), env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True"
    assert {"mdeq", "mdeq.config", "mdeq.models", "mdeq.modules.solvers", "mdeq.core", "mdeq.datasets",
            "mdeq.utils"} <= set(modules)
