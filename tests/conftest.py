import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(autouse=True)
def _fixed_threads():
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    yield
