"""serving/cpp: a C++ program linked against the wheel's libtorch loads model.pt and scores like Python.

The program is built once per session (cmake + make in a temporary folder, about a minute). cmake comes with the
venv (requirements/dev.txt); a C++ compiler must exist on the machine (README: what `make test` needs): without one
the tests fail, saying what to install, rather than skip and leave the C++ scorer unchecked."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

from pimm_model.config import ModelConfig
from pimm_model.export import (
    HashEncoder,
    IdentityEncoder,
    ServingModel,
    VocabEncoder,
    export_torchscript,
    inference_model_from_state,
)
from pimm_model.model import build_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE = os.path.join(REPO, "serving", "cpp")
FIELDS = [("customer", 50), ("fund", 6), ("channel", 9), ("hour", 24)]
TASKS = ["click", "conversion", "core_conversion"]


def _compiler():
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


def _cmake() -> str:
    """The venv's cmake (requirements/dev.txt; its bin/ is not on PATH when pytest runs as .venv/bin/python)."""
    venv = os.path.join(os.path.dirname(sys.executable), "cmake")
    found = venv if os.access(venv, os.X_OK) else shutil.which("cmake")
    assert found, "no cmake: it is in requirements/dev.txt, rerun scripts/setup_env.sh"
    return found


@pytest.fixture(scope="module")
def binary(tmp_path_factory):
    if _compiler() is None:
        pytest.fail("no C++ compiler (c++, g++, clang++ or $CXX): cannot build and check serving/cpp; install one "
                    "(e.g. apt install g++) or point $CXX at it")
    cmake = _cmake()
    build = str(tmp_path_factory.mktemp("cpp-build"))
    prefix = torch.utils.cmake_prefix_path  # the libtorch (headers, libraries, TorchConfig.cmake) inside the wheel
    configure = subprocess.run([cmake, "-S", SOURCE, "-B", build, f"-DCMAKE_PREFIX_PATH={prefix}"],
                               capture_output=True, text=True, timeout=300)
    assert configure.returncode == 0, configure.stdout[-3000:] + configure.stderr[-3000:]
    make = subprocess.run([cmake, "--build", build, "-j", "2"], capture_output=True, text=True, timeout=900)
    assert make.returncode == 0, make.stdout[-3000:] + make.stderr[-3000:]
    path = os.path.join(build, "pimm_score")
    assert os.access(path, os.X_OK)
    return path


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    cfg = ModelConfig(name="pimm", embedding_dim=5, tower_dims=[16, 8])
    torch.manual_seed(0)
    model = build_model(cfg, FIELDS, len(TASKS), torch.device("cpu")).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    core = inference_model_from_state(cfg, FIELDS, len(TASKS), model.state_dict())
    encoders = [IdentityEncoder(50), VocabEncoder(torch.tensor([10, 20, -30, 2**40]), torch.tensor([1, 2, 3, 4]), 5),
                HashEncoder(8, 99, mix=True), IdentityEncoder(24)]
    path = str(tmp_path_factory.mktemp("cpp-model") / "model.pt")
    export_torchscript(ServingModel(core, encoders, TASKS), path)
    return path


def _run(binary, *args):
    return subprocess.run([binary, *args], capture_output=True, text=True, timeout=120)


def test_cpp_scores_equal_python(binary, model_path, tmp_path):
    g = torch.Generator().manual_seed(3)
    rows = 200
    raw = torch.stack([torch.randint(-5, 60, (rows,), generator=g),
                       torch.tensor([10, 20, -30, 2**40, 7])[torch.randint(0, 5, (rows,), generator=g)],
                       torch.randint(-(2**62), 2**62, (rows,), generator=g),
                       torch.randint(0, 24, (rows,), generator=g)], dim=1)
    missing = torch.rand(rows, len(FIELDS), generator=g) < 0.1
    lines = ["# customers to score", ",".join(n for n, _ in FIELDS)]  # a comment and the optional header
    for r in range(rows):
        lines.append(",".join("" if missing[r, i] else str(int(raw[r, i])) for i in range(len(FIELDS))))
    csv = tmp_path / "batch.csv"
    csv.write_text("\n".join(lines) + "\n")
    proc = _run(binary, model_path, str(csv))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout.strip().splitlines()
    assert out[0].split(",") == TASKS and len(out) == rows + 1
    cpp = torch.tensor([[float(x) for x in line.split(",")] for line in out[1:]])
    m = torch.jit.load(model_path)
    with torch.no_grad():
        probs = m(torch.where(missing, torch.zeros_like(raw), raw), missing)
    py = torch.stack([probs[t] for t in TASKS], dim=1)
    assert (cpp - py).abs().max().item() <= 1e-6


def test_cpp_rejects_bad_input(binary, model_path, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("1,2,3\n")
    proc = _run(binary, model_path, str(bad))
    assert proc.returncode == 2 and "3 values, the model takes 4" in proc.stderr
    bad.write_text("1,2,x,4\n")
    proc = _run(binary, model_path, str(bad))
    assert proc.returncode == 2 and "'x' is not an int64" in proc.stderr
    proc = _run(binary, str(tmp_path / "missing.pt"), str(bad))
    assert proc.returncode == 1 and "cannot load" in proc.stderr
