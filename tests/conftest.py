import os

import torch

# Triton kernels are defined at import time; on a machine without CUDA they are tested through
# the interpreter, which must be switched on before any kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

from ultramem import LM, ModelConfig


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_cfg() -> ModelConfig:
    return ModelConfig.preset("tiny")


@pytest.fixture(scope="session")
def tiny_model(tiny_cfg) -> LM:
    return LM(tiny_cfg, seed=0)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module: tiny shapes run as fast, and are immune to OpenMP stalls
    on a shared CPU. Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
