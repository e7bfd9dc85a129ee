"""The PyTorch runner is an optional extra (`pip install -e '.[dev,torch]'`, as .ci/run does): without
torch and transformers these test modules are not collected rather than erroring.

`one_torch_thread`: modules that use it run torch on one thread (the machine is shared and more
threads only contend), restored after the module."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator

import pytest

collect_ignore_glob: list[str] = []
if importlib.util.find_spec("torch") is None or importlib.util.find_spec("transformers") is None:
    collect_ignore_glob.append("*.py")


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
