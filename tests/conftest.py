import os

import torch

# Triton kernels run on CPU tensors through the interpreter when there is no GPU; the variable
# must be set before triton decorates any kernel, so here, before any test module imports.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)
