"""TorchRunner against transformers on tiny random models built from the real DeepSeek configs (fp32 CPU)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from deepseek_serve.engine.runners import ScheduledSeq
from deepseek_serve.engine.runners.pytorch.compile import DecodeStep
from deepseek_serve.engine.runners.pytorch.config import ModelArgs, UnsupportedModelError
from deepseek_serve.engine.runners.pytorch.forward_batch import ForwardBatch, additive_mask
from deepseek_serve.engine.runners.pytorch.loading import CheckpointError, load_model
from deepseek_serve.engine.runners.pytorch.modules import KVCache
from deepseek_serve.engine.runners.pytorch.ops import attend_causal, attend_sdpa
from deepseek_serve.engine.runners.pytorch.packing import PackLayout, Segment, token_rows
from deepseek_serve.engine.runners.pytorch.runner import TorchRunner
from deepseek_serve.engine.runners.pytorch.slots import KVCopy, SlotTable
from deepseek_serve.engine.sequence import Sequence
from deepseek_serve.engine.types import SamplingParams
from tests.support.runner_driver import run_to_completion
from tests.support.torch_models import CODER, R1_32B_OLD, tiny_checkpoint
from tests.support.torch_scoring import score

pytestmark = pytest.mark.usefixtures("one_torch_thread")


VOCAB = 512
ARCHS = {"llama-coder": CODER, "qwen2-r1": R1_32B_OLD}


@pytest.fixture(scope="module", params=list(ARCHS))
def tiny(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    return tiny_checkpoint(tmp_path_factory.mktemp(request.param), ARCHS[request.param], vocab_size=VOCAB)


def make_runner(path: Path, slots: int = 4, max_len: int = 160, **kw: Any) -> TorchRunner:
    model = load_model(path, torch.float32, torch.device("cpu"))
    return TorchRunner(
        model, None, num_slots=slots, max_len=max_len, device=torch.device("cpu"), dtype=torch.float32, **kw
    )


def seq(prompt: list[int], n: int, **params: Any) -> Sequence:
    return Sequence(
        f"r{len(prompt)}-{n}", list(prompt), SamplingParams(**{"temperature": 0.0, **params}), n, float("inf")
    )


def reference(hf: Any, prompt: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
        )
    return list(out[0, len(prompt) :].tolist())


def prompts(lengths: tuple[int, ...], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]


def test_config_fields_are_read(tiny: tuple[Path, Any]) -> None:
    path, hf = tiny
    args = ModelArgs.from_dir(path)
    assert args.num_kv_heads == hf.config.num_key_value_heads
    assert args.rope_theta == pytest.approx(hf.config.rope_parameters["rope_theta"])
    if args.architecture == "LlamaForCausalLM":
        assert args.rope_linear_factor == 4.0 and not args.qkv_bias  # deepseek-coder: linear rope scaling x4
    else:
        assert args.qkv_bias and args.num_kv_heads < args.num_heads


def test_greedy_single_matches_generate(tiny: tuple[Path, Any]) -> None:
    path, hf = tiny
    runner = make_runner(path)
    (p,) = prompts((23,))
    s = seq(p, 20)
    run_to_completion(runner, [s])
    assert s.output_token_ids == reference(hf, p, 20)


def test_greedy_batched_mixed_lengths_match_generate(tiny: tuple[Path, Any]) -> None:
    """Four sequences of different lengths share every step; prompts are fed in 16-token chunks, so
    prefill chunks and decode tokens of different sequences are mixed in one step."""
    path, hf = tiny
    runner = make_runner(path)
    ps = prompts((1, 9, 40, 71), seed=1)
    seqs = [seq(p, 12) for p in ps]
    steps = run_to_completion(runner, seqs, prefill_chunk=16)
    assert steps < 4 * (12 + 5)  # batched, not one sequence after the other
    for p, s in zip(ps, seqs, strict=True):
        assert s.output_token_ids == reference(hf, p, 12), f"prompt of {len(p)} tokens"


def test_overlapped_driver_matches_generate(tiny: tuple[Path, Any]) -> None:
    """Launching step N+1 before taking in step N's tokens (the engine's way, which bench/gpu.py
    measures) feeds each next token from the device: the same tokens as `generate()`, each sequence
    stopping at its own length although a step of it may already be in flight."""
    path, hf = tiny
    runner = make_runner(path)
    ps = prompts((5, 30, 17), seed=2)
    seqs = [seq(p, n) for p, n in zip(ps, (3, 11, 7), strict=True)]
    run_to_completion(runner, seqs, prefill_chunk=16, overlap=True)
    for p, s in zip(ps, seqs, strict=True):
        assert s.output_token_ids == reference(hf, p, s.max_tokens), f"prompt of {len(p)} tokens"
    assert runner.kv_used_tokens == 0  # every sequence freed


def test_packed_prefill_gives_each_sequence_what_it_gives_alone(tiny: tuple[Path, Any]) -> None:
    """Five prompts of different lengths admitted together: every step's chunks (several lengths)
    run as one packed forward, or as several when they exceed the tokens or the chunks of one;
    without packing each chunk runs alone. Token for token, each sequence generates what it
    generates alone."""
    path, _ = tiny
    ps = prompts((3, 17, 40, 71, 9), seed=5)
    alone = []
    for p in ps:
        s = seq(p, 8)
        run_to_completion(make_runner(path, slots=1), [s], prefill_chunk=32)
        alone.append(s.output_token_ids)
    # step 1: chunks of 3, 17, 32, 32, 9 tokens; step 2: 8, 32; step 3: 7
    expected = {
        (1024, 5): [[3, 17, 32, 32, 9], [8, 32], [7]],
        (40, 5): [[3, 17], [32], [32], [9], [8, 32], [7]],
        (1024, 2): [[3, 17], [32, 32], [9], [8, 32], [7]],
        (1024, 1): [[3], [17], [32], [32], [9], [8], [32], [7]],
    }
    for packed_tokens, max_segments in expected:
        runner = make_runner(path, slots=5, packed_prefill=max_segments > 1)
        assert runner.max_segments == (5 if max_segments > 1 else 1)  # packed: up to a chunk per slot
        runner._packed_tokens, runner.max_segments = packed_tokens, max_segments
        forwards: list[list[int]] = []  # chunk lengths of each prefill forward
        prefill_packed = runner._prefill_packed

        def counted(segments: list[Segment], run: Any = prefill_packed, seen: Any = forwards) -> torch.Tensor:
            seen.append([len(s.ids) for s in segments])
            return run(segments)

        runner._prefill_packed = counted  # type: ignore[method-assign]
        seqs = [seq(p, 8) for p in ps]
        run_to_completion(runner, seqs, prefill_chunk=32)
        assert [s.output_token_ids for s in seqs] == alone, (packed_tokens, max_segments)
        assert forwards == expected[packed_tokens, max_segments]


def test_pack_layout_rows_and_blocks() -> None:
    """The host buffer of a packed forward: tokens end to end, query blocks within one segment, each
    segment's last row; from the blocks, each row's rope position, slot and cache position (padding:
    the scratch position)."""
    layout = PackLayout(8, 3)
    tokens, blocks, last = layout.views(layout.pack([Segment([5, 6, 7], 2, 10), Segment([8, 9], 0, 0)]))
    assert tokens.tolist() == [5, 6, 7, 8, 9, 0, 0, 0]
    assert layout.num_blocks == 4
    assert blocks.tolist() == [[2, 10, 0, 3, 3], [0, 0, 3, 2, 2], [0, 0, 5, 0, 3], [0, 0, 0, 0, 0]]
    assert last.tolist() == [2, 4, 0]
    assert token_rows(blocks, 8, 99).tolist() == [
        [10, 11, 12, 0, 1, 0, 0, 0],
        [2, 2, 2, 0, 0, 0, 0, 0],
        [10, 11, 12, 0, 1, 99, 99, 99],
    ]
    with pytest.raises(ValueError, match="do not fit"):
        layout.pack([Segment([1] * 9, 0, 0)])


def test_prefix_cache_reuses_idle_slot(tiny: tuple[Path, Any]) -> None:
    path, hf = tiny
    runner = make_runner(path, slots=2)
    base = prompts((30,), seed=2)[0]
    first = seq(base, 6)
    run_to_completion(runner, [first])
    assert runner.kv_used_tokens == 0
    assert runner.kv_cached_tokens == 30 + 6 - 1  # the last sampled token was never fed
    # same prompt + its continuation: everything but the last prompt token comes from the cache
    follow = base + first.output_token_ids[:3] + [7, 8]
    second = seq(follow, 6)
    assert runner.allocate(second) == 30 + 3
    assert second.num_cached_tokens == 33 and second.slot == 0  # the slot `first` ran in
    runner.free(second)
    # an identical prompt still computes its last token (its logits are needed to sample)
    again = seq(base, 6)
    run_to_completion(runner, [again])
    assert again.num_cached_tokens == 29
    assert again.output_token_ids == first.output_token_ids == reference(hf, base, 6)
    other = seq(prompts((12,), seed=3)[0], 4)
    run_to_completion(runner, [other])
    assert other.num_cached_tokens == 0
    # clearing drops every idle entry and frees their slots
    cached = runner.kv_cached_tokens
    assert cached == (30 + 6 - 1) + (12 + 4 - 1)
    assert [len(entry) for entry in runner.cached_prefixes()] == [12 + 4 - 1, 30 + 6 - 1]  # newest first
    assert runner.clear_prefix_cache() == cached
    assert runner.kv_cached_tokens == 0 and runner.clear_prefix_cache() == 0
    cold = seq(base, 6)
    run_to_completion(runner, [cold])
    assert cold.num_cached_tokens == 0 and cold.output_token_ids == first.output_token_ids


def test_slot_table_keeps_running_sequences_in_the_lowest_slots() -> None:
    # a decode step covers slots 0..n-1, so a lone stream must sit in slot 0 (one row).
    table = SlotTable(num_slots=4, max_len=100)
    a_ids, b_ids = list(range(1, 21)), list(range(50, 60))
    a = table.allocate(a_ids, 30)
    assert (a.slot, a.num_cached_tokens, a.copies) == (0, 0, ())
    table.release(0, a_ids)
    # an unrelated prompt takes slot 0; a's entry is parked in the highest free slot, not lost
    b = table.allocate(b_ids, 30)
    assert (b.slot, b.num_cached_tokens) == (0, 0)
    assert b.copies == (KVCopy(0, 3, 20),)
    table.release(0, b_ids)
    # a's continuation: slot 0 again; b's entry is parked, a's prefix copied in from slot 3
    c = table.allocate([*a_ids, 99], 30)
    assert (c.slot, c.num_cached_tokens) == (0, 20)
    assert c.copies == (KVCopy(0, 2, 10), KVCopy(3, 0, 20))
    # the best prefix already in the lowest slot is reused in place
    table.release(0, [*a_ids, 99])
    d = table.allocate([*a_ids, 99, 98], 30)
    assert (d.slot, d.num_cached_tokens, d.copies) == (0, 21, ())
    # no free slot left to park in: the entry in the target slot is evicted
    for ids in ([7, 8], [9, 10], [11, 12]):
        table.release(table.allocate(ids, 10).slot, ids)
    assert table.allocate([5, 6], 10).copies == ()


def test_prefix_copied_from_a_parked_entry_gives_the_same_tokens(tiny: tuple[Path, Any]) -> None:
    path, hf = tiny
    runner = make_runner(path, slots=4)
    base, other = prompts((30, 12), seed=5)
    first = seq(base, 6)
    run_to_completion(runner, [first])
    unrelated = seq(other, 4)
    run_to_completion(runner, [unrelated])  # runs in slot 0; `first`'s KV is parked in slot 3
    assert unrelated.output_token_ids == reference(hf, other, 4)
    follow = base + first.output_token_ids[:3]
    again = seq(follow, 6)
    run_to_completion(runner, [again])
    assert again.num_cached_tokens == len(follow) - 1
    assert again.output_token_ids == reference(hf, follow, 6)


def test_capacity_and_free(tiny: tuple[Path, Any]) -> None:
    path, _ = tiny
    runner = make_runner(path, slots=2, max_len=64, prefix_cache=False)
    a, b, c = (seq(p, 10) for p in prompts((5, 6, 7), seed=4))
    assert not runner.can_allocate(seq(list(range(60)), 10))  # 70 > max_len 64
    runner.allocate(a)
    runner.allocate(b)
    assert runner.kv_used_tokens == 15 + 16 and runner.kv_capacity_tokens == 128
    assert not runner.can_allocate(c)
    runner.free(a)
    assert a.slot is None and runner.can_allocate(c)
    runner.allocate(c)
    assert c.slot is not None and c.slot != b.slot


def test_step_advances_computed_tokens_and_samples_only_when_asked(tiny: tuple[Path, Any]) -> None:
    path, _ = tiny
    runner = make_runner(path)
    s = seq(list(range(1, 21)), 4)
    runner.allocate(s)
    assert runner.step([ScheduledSeq(s, 12, False)]) == [None]
    assert s.num_computed_tokens == 12
    (res,) = runner.step([ScheduledSeq(s, 8, True)])
    assert res is not None and 0 <= res.token_id < VOCAB and s.num_computed_tokens == 20


def test_bad_entries_fail_alone(tiny: tuple[Path, Any]) -> None:
    """Input the model must not see (ids outside the vocabulary) and a row whose sampling raises fail
    their own entry only; the others of the same step go on and sample what they sample alone."""
    path, _ = tiny
    prompt = prompts((10,), seed=8)[0]
    alone = seq(prompt, 4, temperature=1.0, seed=3)
    runner = make_runner(path)
    runner.allocate(alone)
    (expected,) = runner.step([ScheduledSeq(alone, 10, True)])
    assert expected is not None and expected.error is None

    runner = make_runner(path)
    good = seq(prompt, 4, temperature=1.0, seed=3)
    bad_ids = seq([1, 2, VOCAB + 5], 4)
    bad_bias = seq(prompt, 4, temperature=1.0, logit_bias=((VOCAB * 3, 5.0),))  # past SamplingParams.validate
    for s in (good, bad_ids, bad_bias):
        runner.allocate(s)
    res = runner.step([ScheduledSeq(good, 10, True), ScheduledSeq(bad_ids, 3, True), ScheduledSeq(bad_bias, 10, True)])
    assert res[0] is not None and res[0].error is None and res[0].token_id == expected.token_id
    assert res[1] is not None and res[1].error is not None and "vocabulary" in res[1].error
    assert bad_ids.num_computed_tokens == 0
    assert res[2] is not None and res[2].error is not None and "logit_bias" in res[2].error


def test_logit_bias_forces_a_token(tiny: tuple[Path, Any]) -> None:
    path, _ = tiny
    p = prompts((12,), seed=9)[0]
    forced = [seq(p, 5, logit_bias=((7, 100.0),)), seq(p, 5, temperature=1.0, seed=1, logit_bias=((7, 100.0),))]
    run_to_completion(make_runner(path), forced)
    # alone, a greedy row with a bias is not taken for plain greedy (argmax without the sampler)
    alone = seq(p, 5, logit_bias=((7, 100.0),))
    run_to_completion(make_runner(path), [alone])
    assert all(s.output_token_ids == [7] * 5 for s in [*forced, alone])


def test_seeded_sampling_is_independent_of_the_batch(tiny: tuple[Path, Any]) -> None:
    path, _ = tiny
    ps = prompts((11, 17, 25), seed=5)
    params = {"temperature": 1.0, "top_p": 0.9, "top_k": 50, "seed": 1234}
    alone = seq(ps[0], 10, **params)
    run_to_completion(make_runner(path), [alone])
    crowd = [
        seq(ps[0], 10, **params),
        seq(ps[1], 10, temperature=0.7),
        seq(ps[2], 10, **{**params, "seed": 9}),
    ]
    run_to_completion(make_runner(path), crowd)
    assert crowd[0].output_token_ids == alone.output_token_ids
    assert crowd[2].output_token_ids != alone.output_token_ids  # another seed draws other tokens
    greedy = seq(ps[0], 10)
    topk1 = seq(ps[0], 10, temperature=1.0, top_k=1)
    run_to_completion(make_runner(path), [greedy, topk1])
    assert topk1.output_token_ids == greedy.output_token_ids


def test_repetition_penalty_changes_greedy_choice(tiny: tuple[Path, Any]) -> None:
    path, _ = tiny
    p = prompts((15,), seed=6)[0]
    plain, penal = seq(p, 16), seq(p, 16, repetition_penalty=10.0, frequency_penalty=2.0)
    run_to_completion(make_runner(path), [plain, penal])
    window = set(p)
    assert plain.output_token_ids != penal.output_token_ids
    # with a strong penalty the output repeats its own/prompt tokens less
    repeats = lambda out: sum(t in window or out[:i].count(t) > 0 for i, t in enumerate(out))  # noqa: E731
    assert repeats(penal.output_token_ids) < repeats(plain.output_token_ids) or repeats(plain.output_token_ids) == 0


def test_logprobs_are_those_of_the_model(tiny: tuple[Path, Any]) -> None:
    path, hf = tiny
    p = prompts((10,), seed=7)[0]
    s = seq(p, 3, logprobs=True, top_logprobs=3)
    run_to_completion(make_runner(path), [s])
    with torch.no_grad():
        logits = hf(torch.tensor([p + s.output_token_ids])).logits[0].float()
    ref = torch.log_softmax(logits, dim=-1)
    for i, lp in enumerate(s.output_logprobs):
        row = ref[len(p) - 1 + i]
        assert lp.token_id == s.output_token_ids[i]
        assert lp.logprob == pytest.approx(row[lp.token_id].item(), abs=1e-4)
        assert [t[1] for t in lp.top] == pytest.approx(row.topk(3).values.tolist(), abs=1e-4)


def test_score_gives_next_token_logprobs(tiny: tuple[Path, Any]) -> None:
    path, hf = tiny
    p = prompts((33,), seed=8)[0]
    got = score(make_runner(path), p)
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([p])).logits[0, :-1].float(), -1).gather(
            1, torch.tensor(p[1:])[:, None]
        )
    torch.testing.assert_close(got, ref[:, 0], atol=1e-4, rtol=1e-4)


def test_unsupported_and_broken_checkpoints(tmp_path: Path, tiny: tuple[Path, Any]) -> None:
    with pytest.raises(UnsupportedModelError, match="architecture"):
        ModelArgs.from_config({"architectures": ["GPT2LMHeadModel"]})
    base = {
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "vocab_size": 10,
    }
    with pytest.raises(UnsupportedModelError, match="rope type 'yarn'"):
        ModelArgs.from_config({**base, "rope_scaling": {"type": "yarn", "factor": 2.0}})
    path, _ = tiny
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((path / "config.json").read_text())
    state = load_file(str(path / "model.safetensors"))
    state.pop("model.layers.1.mlp.down_proj.weight")
    save_file(state, str(broken / "model.safetensors"))
    with pytest.raises(CheckpointError, match="down_proj"):
        load_model(broken, torch.float32, torch.device("cpu"))
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors"):
        load_model(tmp_path, torch.float32, torch.device("cpu"))


def test_traced_decode_step_matches_eager_and_compiles_once_per_row_class(tiny: tuple[Path, Any]) -> None:
    """The compiled decode step (traced whole here with aot_eager, CPU): same logits, argmax and cache
    writes as the eager model; one graph per function for 1 row and one for more rows, at any KV length."""
    from torch._dynamo.utils import counters

    model = load_model(tiny[0], torch.float32, torch.device("cpu"))
    args = model.args
    model.setup_rope(129, "cpu")
    torch._dynamo.reset()
    # the second step adds the biases after the matmuls (`bias_apart`: the qkv bias of Qwen2 shapes)
    steps = [DecodeStep(model, backend="aot_eager", attention="sdpa")]
    steps.append(DecodeStep(model, backend="aot_eager", attention="reductions", bias_apart=True))
    steps[0].eager_argmax = False  # the argmax inside the compiled head: one step covers each head
    before = counters["stats"]["unique_graphs"]
    for n, kv_len in ((1, 32), (1, 64), (2, 32), (4, 64)):
        pos = torch.arange(n) + 5 * n
        tok = torch.randint(0, VOCAB, (n, 1), generator=torch.Generator().manual_seed(n))
        mask = additive_mask((torch.arange(kv_len)[None, :] <= pos[:, None]).view(n, 1, 1, kv_len), torch.float32)
        fb = ForwardBatch(slots=None, positions=pos[:, None], write_pos=pos[:, None], mask=mask)
        caches = [KVCache(args, 4, 128, torch.float32, "cpu") for _ in range(3)]
        for c in caches:
            c.kv.normal_(generator=torch.Generator().manual_seed(1))
        with torch.inference_mode():
            ref = model(tok, caches[0], fb)[:, 0]
            for step, cache in zip(steps, caches[1:], strict=True):
                logits, greedy = step(tok, cache, fb)
                torch.testing.assert_close(logits, ref)
                assert torch.equal(greedy, ref.argmax(dim=-1))
                torch.testing.assert_close(cache.kv, caches[0].kv)
    # layer and head for 1 row and for many rows; the layer and the logits-only head again for the
    # other step (other attention, argmax outside)
    assert counters["stats"]["unique_graphs"] - before == 8


@pytest.mark.gpu
def test_cuda_graphs_match_generate(tmp_path: Path) -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    path, hf = tiny_checkpoint(tmp_path, R1_32B_OLD, vocab_size=VOCAB)
    model = load_model(path, torch.float32, torch.device("cuda"))
    runner = TorchRunner(model, None, num_slots=4, max_len=160, device=torch.device("cuda"), dtype=torch.float32)
    ps = prompts((1, 9, 40, 71), seed=1)
    seqs = [seq(p, 12) for p in ps]
    run_to_completion(runner, seqs, prefill_chunk=16)
    refs = [reference(hf, p, 12) for p in ps]
    for s, ref in zip(seqs, refs, strict=True):
        assert s.output_token_ids == ref
    # one sequence in slot 0 of a fresh runner: the compiled 1-row decode graph
    solo_runner = TorchRunner(model, None, num_slots=4, max_len=160, device=torch.device("cuda"), dtype=torch.float32)
    assert solo_runner.decode_step is not None
    solo = seq(ps[2], 12)
    run_to_completion(solo_runner, [solo], prefill_chunk=16)
    assert solo.output_token_ids == refs[2]


@pytest.mark.parametrize(("h", "hk", "t", "s"), [(12, 2, 7, 40), (4, 4, 5, 5), (6, 2, 1, 9), (8, 2, 33, 33)])
def test_causal_tail_attention_matches_the_mask(h: int, hk: int, t: int, s: int) -> None:
    """One sequence's prefill chunk through SDPA's bottom-right causal mask (flash / efficient kernels)
    equals the explicit `key <= position` mask over the folded GQA heads."""
    g = torch.Generator().manual_seed(h * 100 + t)
    q = torch.randn(1, t, h, 16, generator=g)
    kvs = torch.randn(1, hk, s + 3, 32, generator=g)[:, :, :s]  # a view of a longer cache, as in the runner
    pos = torch.arange(s - t, s)
    mask = additive_mask((torch.arange(s)[None, :] <= pos[:, None]).view(1, 1, t, s), torch.float32)
    torch.testing.assert_close(attend_causal(q, kvs, hk), attend_sdpa(q, kvs, mask, hk), atol=1e-5, rtol=1e-5)


def test_warmup_runs_prefill_shapes_before_serving_only(tiny: tuple[Path, Any]) -> None:
    """warmup() prefills into slots 0/1 and samples once: afterwards generation is unchanged, idle
    prefix entries (whose KV it overwrote) are gone, and with a sequence allocated it refuses."""
    path, hf = tiny
    runner = make_runner(path, slots=2)
    p = prompts((30,), seed=4)[0]
    first = seq(p, 6)
    run_to_completion(runner, [first])
    assert runner.kv_cached_tokens > 0
    assert runner.warmup(64) == 0  # no CUDA graphs on CPU
    assert runner.kv_cached_tokens == 0
    again = seq(p, 6)
    run_to_completion(runner, [again])
    assert again.num_cached_tokens == 0 and again.output_token_ids == reference(hf, p, 6)
    busy = seq(p, 6)
    runner.allocate(busy)
    with pytest.raises(RuntimeError, match="before any sequence"):
        runner.warmup()
