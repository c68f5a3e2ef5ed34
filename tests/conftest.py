import pytest
import torch

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
