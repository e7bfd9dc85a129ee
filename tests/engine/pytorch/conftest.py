"""The PyTorch runner is an optional extra (`pip install -e '.[dev,torch]'`, as .ci/run does): without
torch and transformers these test modules are not collected rather than erroring."""

from __future__ import annotations

import importlib.util

collect_ignore_glob: list[str] = []
if importlib.util.find_spec("torch") is None or importlib.util.find_spec("transformers") is None:
    collect_ignore_glob.append("*.py")
