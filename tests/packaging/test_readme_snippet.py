"""The README's example of the equilibrium layer runs as printed, and its claims hold: the implicit gradient equals
autograd through an unrolled fixed-point iteration, and the phantom gradient points the same way."""
import contextlib
import io
import os
import re

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SECTION = "## Using the equilibrium layer in your own model"


def readme_snippet():
    """The first ```python block of the README section on the equilibrium layer."""
    with open(os.path.join(ROOT, "README.md")) as fh:
        text = fh.read()
    assert SECTION in text
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert blocks, "the section has no python block"
    return blocks[0]


def run(source):
    namespace = {"__name__": "readme_snippet"}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(source, "README.md", "exec"), namespace)
    return namespace, out.getvalue()


def unrolled_reference(cell, x, steps=100):
    """Gradients of the snippet's loss by autograd through ``steps`` plain applications of f (f contracts)."""
    z = torch.zeros_like(x)
    for _ in range(steps):
        z = cell(z, x)
    return torch.autograd.grad(z.square().mean(), [cell.conv.weight, x])


def test_readme_snippet_runs_and_its_implicit_gradient_is_exact():
    source = readme_snippet()
    assert 'backward="implicit"' in source
    ns, out = run(source)
    assert "solvers: ['anderson', 'broyden', 'fixed_point', 'lbroyden']" in out
    nstep = int(re.search(r"forward: (\d+) iterations", out).group(1))
    rel = float(re.search(r"relative residual (\S+)", out).group(1))
    assert nstep < 50 and rel < 1e-5  # converged before the cap
    ref_w, ref_x = unrolled_reference(ns["cell"], ns["x"])
    for got, ref in ((ns["cell"].conv.weight.grad, ref_w), (ns["x"].grad, ref_x)):
        assert ((got - ref).norm() / ref.norm()).item() < 1e-4


def test_readme_snippet_with_phantom_gradient():
    ns, _ = run(readme_snippet().replace('backward="implicit"', 'backward="phantom"'))
    assert ns["deq"].backward_mode == "phantom"
    _, ref_x = unrolled_reference(ns["cell"], ns["x"])
    got = ns["x"].grad
    cosine = torch.nn.functional.cosine_similarity(got.flatten(), ref_x.flatten(), dim=0).item()
    assert cosine > 0.99
    assert 1e-3 < ((got - ref_x).norm() / ref_x.norm()).item() < 0.2  # an approximation, not the exact gradient
