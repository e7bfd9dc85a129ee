"""The gateway and speculative decoding: a request's opt-out reaches the upstream engine, and the
upstream's `usage.speculative_tokens` comes back in the request's usage."""

from __future__ import annotations

import time

from deepseek_serve.engine.types import GenerationRequest, SamplingParams
from deepseek_serve.gateway.engine import _completion_body, _Job


def test_the_opt_out_is_forwarded_and_the_default_adds_nothing() -> None:
    opted_out = GenerationRequest("a", prompt_token_ids=(1, 2), params=SamplingParams(speculative=False))
    default = GenerationRequest("b", prompt_token_ids=(1, 2), params=SamplingParams())
    assert _completion_body("m", [1, 2], 8, opted_out)["speculative"] is False
    assert "speculative" not in _completion_body("m", [1, 2], 8, default)


def test_upstream_speculative_counts_reach_the_usage() -> None:
    request = GenerationRequest("a", prompt_token_ids=(1, 2, 3), params=SamplingParams())
    job = _Job(request, {}, "", [1, 2, 3], time.monotonic(), 60.0)
    usage = {"completion_tokens": 9, "speculative_tokens": {"drafted": 12, "accepted": 7}}
    delta = job.final("stop", None, usage)
    assert delta.usage is not None
    assert (delta.usage.completion_tokens, delta.usage.drafted_tokens, delta.usage.accepted_tokens) == (9, 12, 7)
    plain = job.final("stop", None, {"completion_tokens": 9})
    assert plain.usage is not None and (plain.usage.drafted_tokens, plain.usage.accepted_tokens) == (0, 0)
