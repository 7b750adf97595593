"""A user's project, written once per session: a package with a model factory, data functions and weights.

The commands run in subprocesses from that folder (as a user runs them), with the curvkit under test
first on their path; the tests compare what they write against the Python API on the same model and
seed and against dense float64 Hessians.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import curvkit

MODELS = '''
    import torch
    from torch import nn


    def make_net():
        return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).float()


    net = make_net()


    def make_wider_net():
        return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).float()


    def not_a_model():
        return {"layers": 2}


    def needs_width(width):
        return nn.Linear(4, width)
'''

DATA = '''
    import torch


    def _samples():
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(96, 4, generator=gen, dtype=torch.float32)
        return x, torch.randint(0, 3, (96,), generator=gen)


    def batches():
        x, y = _samples()
        return [(x[i:i + 32], y[i:i + 32]) for i in range(0, 96, 32)]


    def one_batch():
        return _samples()


    def stream():
        yield from batches()


    def inputs_only():
        return [x for x, _ in batches()]
'''


class Project:
    """The user's folder: ``userpkg.models``, ``userpkg.data`` and trained weights ``net.pt``."""

    def __init__(self, root: Path):
        self.root = root
        package = root / "userpkg"
        package.mkdir()
        (package / "__init__.py").write_text("")
        (package / "models.py").write_text(textwrap.dedent(MODELS))
        (package / "data.py").write_text(textwrap.dedent(DATA))
        sys.path.insert(0, str(root))
        from userpkg import data, models

        self.models, self.data = models, data
        self.weights = root / "net.pt"
        torch.save(self.trained().state_dict(), self.weights)

    def trained(self) -> torch.nn.Module:
        """``make_net()`` after 100 full-batch Adam steps from seed 0."""
        torch.manual_seed(0)
        model = self.models.make_net()
        x, y = self.data.one_batch()
        opt = torch.optim.Adam(model.parameters(), lr=0.05)
        for _ in range(100):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        return model

    def model(self) -> torch.nn.Module:
        """What ``--model userpkg.models:make_net --weights net.pt`` loads."""
        model = self.models.make_net()
        model.load_state_dict(torch.load(self.weights, weights_only=True))
        return model.eval()

    def run(self, *argv: str) -> subprocess.CompletedProcess:
        """``python -m curvkit ARGV`` in the project folder, with the curvkit under test on the path."""
        env = {**os.environ, "PYTHONPATH": str(Path(curvkit.__file__).parents[1]), "CURVKIT_KERNELS": "0",
               "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
        return subprocess.run([sys.executable, "-m", "curvkit", *argv], cwd=self.root, env=env, capture_output=True,
                              text=True, timeout=300)

    def analyse(self, command: str, out: str, *extra: str) -> subprocess.CompletedProcess:
        """Run ``command`` on the trained model and the three batches, writing into ``out``; it must succeed."""
        result = self.run(command, "--model", "userpkg.models:make_net", "--weights", "net.pt",
                          "--data", "userpkg.data:batches", "--out", out, *extra)
        assert result.returncode == 0, result.stderr
        return result


@pytest.fixture(scope="session")
def project(tmp_path_factory):
    """The user's project (its folder is on this process's path while the session runs)."""
    made = Project(tmp_path_factory.mktemp("project"))
    yield made
    sys.path.remove(str(made.root))
    for name in [m for m in sys.modules if m == "userpkg" or m.startswith("userpkg.")]:
        del sys.modules[name]


@pytest.fixture(scope="session")
def dense(project):
    """The dense float64 Hessian of the mean cross-entropy over all 96 samples at the trained weights."""
    model = project.model()
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    x, y = project.data.one_batch()

    def loss(flat):
        chunks = torch.split(flat, [s.numel() for s in shapes])
        params = {n: c.reshape(s) for n, c, s in zip(names, chunks, shapes)}
        return F.cross_entropy(torch.func.functional_call(model.double(), params, (x.double(),)), y)

    flat = torch.cat([p.detach().double().reshape(-1) for p in model.parameters()])
    return torch.autograd.functional.hessian(loss, flat)
