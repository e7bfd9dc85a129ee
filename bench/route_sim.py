"""Routing simulator: a multi-turn chat trace through the gateway's routing policy over N modelled engines.

    python bench/route_sim.py [--engines 1,2,4,8,16,32,64] [--duration 600] [--seed 0] [--jobs 2]

The trace (fixed seed): conversations start as a Poisson process at `--rate` conversations/s per engine
(so offered load per engine is the same for every N); each picks one of `--system-prompts` system prompts
(Zipf-weighted), has 1-8 turns, and its next turn is sent a think time after the previous answer ended.
A turn's prompt is the system prompt, every earlier question and answer, and the new question, so turn
t+1 extends turn t's prompt plus answer, as an OpenAI chat client resends the history.

Each engine is a continuous-batching engine as in src/deepseek_serve/engine: `--batch` slots, FCFS
admission, every step decodes one token per running sequence and spends the rest on up to `--chunk`
prompt tokens. Step time = `--step-ms` + `--seq-ms` x decoding sequences + `--span-ms` x occupied KV cells / 1000
(llama.cpp attends over the whole occupied span of the unified cache, idle entries included)
+ `--prefill-ms` x prompt tokens.
Its prefix cache mirrors the llama.cpp runner: a finished request's tokens stay as an idle entry
(at most `--cache-tokens` idle tokens, LRU; a conversation's newer entry replaces its older one); an
admitted request reuses the longest cached prefix (its conversation's entry, else any cached or running
sequence with the same system prompt), and always recomputes at least one token.

Default costs come from docs/performance.md (SmolLM2-135M Q4_1, 2 vCPU EPYC, quiet):
- decode: "Engine" table, 125.3 tok/s at 1 stream and 203.8 tok/s at 8 streams, i.e. a step of
  7.98 ms at 1 and 39.25 ms at 8 sequences -> 3.51 ms + 4.47 ms per sequence (4 streams: predicts
  21.4 ms, measured 22.0 ms).
- KV span: "Engine", cause 2: one stream decodes at 121 tok/s with an empty cache and 109 tok/s with
  15 idle entries of 160 tokens (2,400 cells): 0.38 ms more per step and 1,000 occupied cells.
- prefill: "Tuning", multi-turn rows (c=4, 32 tokens, ~510-token prompts of which ~460 are reused
  with the prefix cache): 0.30 requests/s without the cache against 1.43 with it, i.e. 2.63 s more
  engine time for ~460 more prompt tokens = 5.7 ms per prompt token on that loaded run, where
  decode ran 2.3x slower than in the quiet "Engine" table (c=4 aggregate 78 against 182 tok/s):
  2.45 ms per prompt token on the quiet machine.
Other hardware: pass its own figures; `--prefill-ms` matters most (see docs/scaling.md).

Policies: `rr` (round-robin), `p2c` (less loaded of two random engines, no prefix memory) and `prefix`
(deepseek_serve.gateway.routing.PrefixRouter: the policy the gateway runs). The router sees each
engine's load as (running + waiting) / batch at the moment of the decision.
Prints one Markdown table: throughput, TTFT percentiles, prefix-hit rate (reused / all prompt tokens),
and the two target ratios at each N: TTFT p99 against round-robin, hit rate against one engine.
"""

from __future__ import annotations

import argparse
import heapq
import math
import platform
import random
import statistics
import subprocess
import sys
from collections import OrderedDict, deque
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from deepseek_serve.gateway.routing import Candidate, PrefixRouter

CHARS_PER_TOKEN = 4
POLICIES = ("rr", "p2c", "prefix")


@dataclass(frozen=True)
class Costs:
    step_ms: float
    seq_ms: float
    prefill_ms: float
    span_ms: float
    batch: int
    chunk: int
    cache_tokens: int


@dataclass(frozen=True)
class Turn:
    question: int  # tokens
    answer: int  # tokens
    think_s: float  # pause after the previous answer


@dataclass(frozen=True)
class Conversation:
    index: int
    start_s: float
    system: int
    turns: tuple[Turn, ...]


@dataclass
class Request:
    conversation: Conversation
    turn: int
    arrival: float
    prompt_tokens: int
    text: str
    engine: int = -1
    admitted: bool = False
    reused: int = 0
    prefill_left: int = 0
    decode_left: int = 0
    first_token: float = math.nan
    finished: float = math.nan


@dataclass
class Engine:
    index: int
    costs: Costs
    waiting: deque[Request] = field(default_factory=deque)
    running: list[Request] = field(default_factory=list)
    busy: bool = False
    # conversation index -> (cached tokens, system prompt), LRU order
    idle: OrderedDict[int, tuple[int, int]] = field(default_factory=OrderedDict)
    idle_tokens: int = 0
    busy_s: float = 0.0
    system_refs: dict[int, int] = field(default_factory=dict)

    @property
    def load(self) -> float:
        return (len(self.running) + len(self.waiting)) / self.costs.batch

    def _ref(self, system: int, delta: int) -> None:
        self.system_refs[system] = self.system_refs.get(system, 0) + delta

    def admit(self, system_tokens: Sequence[int]) -> None:
        while self.waiting and len(self.running) < self.costs.batch:
            req = self.waiting.popleft()
            conv = req.conversation
            entry = self.idle.pop(conv.index, None)
            if entry is not None:
                self.idle_tokens -= entry[0]
                self._ref(entry[1], -1)
                reused = entry[0]
            elif self.system_refs.get(conv.system, 0) > 0:
                reused = system_tokens[conv.system]
            else:
                reused = 0
            req.reused = min(reused, req.prompt_tokens - 1)
            req.prefill_left = req.prompt_tokens - req.reused
            req.decode_left = conv.turns[req.turn].answer
            req.admitted = True
            self._ref(conv.system, 1)
            self.running.append(req)

    def plan_step(self) -> tuple[float, list[tuple[Request, int]]]:
        """Step duration (s) and the prompt chunks it computes."""
        decoding = sum(1 for r in self.running if r.prefill_left == 0)
        budget = self.costs.chunk
        chunks: list[tuple[Request, int]] = []
        for req in self.running:
            if budget == 0:
                break
            if req.prefill_left > 0:
                n = min(budget, req.prefill_left)
                chunks.append((req, n))
                budget -= n
        prefill = self.costs.chunk - budget
        ms = self.costs.prefill_ms * prefill
        if decoding:
            cells = self.idle_tokens + sum(r.prompt_tokens - r.prefill_left for r in self.running)
            ms += self.costs.step_ms + self.costs.seq_ms * decoding + self.costs.span_ms * cells / 1000
        return ms / 1000.0, chunks

    def finish(self, req: Request) -> None:
        conv = req.conversation
        self._ref(conv.system, -1)
        tokens = req.prompt_tokens + conv.turns[req.turn].answer
        if tokens <= self.costs.cache_tokens:
            self.idle[conv.index] = (tokens, conv.system)
            self.idle_tokens += tokens
            self._ref(conv.system, 1)
        while self.idle_tokens > self.costs.cache_tokens:
            _, (old_tokens, old_system) = self.idle.popitem(last=False)
            self.idle_tokens -= old_tokens
            self._ref(old_system, -1)


@dataclass(frozen=True)
class Trace:
    conversations: tuple[Conversation, ...]
    system_tokens: tuple[int, ...]
    system_texts: tuple[str, ...]


def make_trace(seed: int, num_engines: int, rate: float, duration: float, num_systems: int, think_s: float) -> Trace:
    rng = random.Random(f"route-sim:{seed}")
    system_tokens = tuple(rng.randint(200, 600) for _ in range(num_systems))
    system_texts = tuple(_text(rng, n) for n in system_tokens)
    weights = [1.0 / (i + 1) for i in range(num_systems)]
    conversations: list[Conversation] = []
    t = 0.0
    while True:
        t += rng.expovariate(rate * num_engines)
        if t >= duration:
            break
        turns = tuple(
            Turn(
                question=rng.randint(15, 120),
                answer=rng.randint(40, 250),
                think_s=0.0 if k == 0 else rng.expovariate(1.0 / think_s),
            )
            for k in range(rng.randint(1, 8))
        )
        system = rng.choices(range(num_systems), weights)[0]
        conversations.append(Conversation(len(conversations), t, system, turns))
    return Trace(tuple(conversations), system_tokens, system_texts)


def _text(rng: random.Random, tokens: int) -> str:
    return rng.randbytes(tokens * CHARS_PER_TOKEN // 2).hex()


@dataclass(frozen=True)
class Result:
    engines: int
    policy: str
    requests: int
    req_s: float
    out_tok_s: float
    ttft_p50: float
    ttft_p90: float
    ttft_p99: float
    hit_rate: float
    busy: float  # fraction of the time engines were stepping
    lifetime_s: float  # mean time from a conversation's first request to its last answer
    footprint: float  # mean prompt + answer tokens a finished request leaves in the cache


def simulate(
    trace: Trace,
    num_engines: int,
    policy: str,
    costs: Costs,
    *,
    seed: int,
    warmup: float,
    duration: float,
    busy_margin: float,
    use_conversation_ids: bool,
) -> Result:
    engines = [Engine(i, costs) for i in range(num_engines)]
    names = [f"engine-{i}" for i in range(num_engines)]
    by_name = {name: i for i, name in enumerate(names)}
    router = PrefixRouter(busy_margin=busy_margin, seed=seed)
    rr_next = 0
    events: list[tuple[float, int, int, object]] = []  # (time, order, kind, payload)
    order = 0
    ARRIVE, STEP = 0, 1
    # per conversation: text of the prompt and answers so far
    history: dict[int, str] = {}
    step_chunks: dict[int, list[tuple[Request, int]]] = {}
    done: list[Request] = []
    rng_text = random.Random(f"route-sim-text:{seed}")

    def push(time: float, kind: int, payload: object) -> None:
        nonlocal order
        order += 1
        heapq.heappush(events, (time, order, kind, payload))

    def send(conv: Conversation, turn: int, now: float) -> None:
        spec = conv.turns[turn]
        prefix = history.get(conv.index, trace.system_texts[conv.system])
        text = prefix + _text(rng_text, spec.question)
        history[conv.index] = text
        prior = trace.system_tokens[conv.system] + sum(t.question + t.answer for t in conv.turns[:turn])
        push(now, ARRIVE, Request(conv, turn, now, prior + spec.question, text))

    def start_step(engine: Engine, now: float) -> None:
        engine.admit(trace.system_tokens)
        if not engine.running:
            engine.busy = False
            return
        engine.busy = True
        dt, chunks = engine.plan_step()
        engine.busy_s += dt
        step_chunks[engine.index] = chunks
        push(now + dt, STEP, engine)

    for conv in trace.conversations:
        send(conv, 0, conv.start_s)

    while events:
        now, _, kind, payload = heapq.heappop(events)
        if kind == ARRIVE:
            assert isinstance(payload, Request)
            req = payload
            conv_id = str(req.conversation.index) if use_conversation_ids else None
            if policy == "rr":
                target = rr_next
                rr_next = (rr_next + 1) % num_engines
            else:
                candidates = [Candidate(names[i], e.load) for i, e in enumerate(engines)]
                # p2c: the same router with no memory to go by (no conversation ids, nothing observed)
                target = by_name[router.choose(req.text, conv_id if policy == "prefix" else None, candidates)]
            req.engine = target
            engine = engines[target]
            engine.waiting.append(req)
            if not engine.busy:
                start_step(engine, now)
            continue
        assert isinstance(payload, Engine)
        engine = payload
        computed = {id(req): n for req, n in step_chunks.pop(engine.index)}
        still: list[Request] = []
        for req in engine.running:
            if req.prefill_left > 0:
                req.prefill_left -= computed.get(id(req), 0)
                if req.prefill_left > 0:
                    still.append(req)
                    continue
                req.first_token = now
            req.decode_left -= 1
            if req.decode_left > 0:
                still.append(req)
                continue
            req.finished = now
            engine.finish(req)
            done.append(req)
            conv = req.conversation
            if policy == "prefix":
                conv_id = str(conv.index) if use_conversation_ids else None
                router.observe(req.text, conv_id, names[engine.index])
            history[conv.index] += _text(rng_text, conv.turns[req.turn].answer)
            if req.turn + 1 < len(conv.turns):
                send(conv, req.turn + 1, now + conv.turns[req.turn + 1].think_s)
        engine.running = still
        start_step(engine, now)

    measured = [r for r in done if warmup <= r.arrival < duration]
    ends: dict[int, float] = {}
    for r in done:
        if r.turn == len(r.conversation.turns) - 1:
            ends[r.conversation.index] = r.finished - r.conversation.start_s
    lifetimes = [t for i, t in ends.items() if warmup <= trace.conversations[i].start_s < duration]
    ttfts = sorted(r.first_token - r.arrival for r in measured)
    prompt = sum(r.prompt_tokens for r in measured)
    window = duration - warmup
    return Result(
        engines=num_engines,
        policy=policy,
        requests=len(measured),
        req_s=len(measured) / window,
        out_tok_s=sum(r.conversation.turns[r.turn].answer for r in measured) / window,
        ttft_p50=_percentile(ttfts, 50),
        ttft_p90=_percentile(ttfts, 90),
        ttft_p99=_percentile(ttfts, 99),
        hit_rate=sum(r.reused for r in measured) / prompt if prompt else math.nan,
        busy=sum(e.busy_s for e in engines) / (num_engines * now),
        lifetime_s=statistics.fmean(lifetimes) if lifetimes else math.nan,
        footprint=statistics.fmean(r.prompt_tokens + r.conversation.turns[r.turn].answer for r in measured)
        if measured
        else math.nan,
    )


def _percentile(values: Sequence[float], p: float) -> float:
    if not values:
        return math.nan
    k = (len(values) - 1) * p / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def _run(job: tuple[argparse.Namespace, int, str]) -> Result:
    args, num_engines, policy = job
    costs = Costs(args.step_ms, args.seq_ms, args.prefill_ms, args.span_ms, args.batch, args.chunk, args.cache_tokens)
    trace = make_trace(args.seed, num_engines, args.rate, args.duration, args.system_prompts, args.think_s)
    return simulate(
        trace,
        num_engines,
        policy,
        costs,
        seed=args.seed,
        warmup=args.warmup,
        duration=args.duration,
        busy_margin=args.busy_margin,
        use_conversation_ids=args.conversation_ids,
    )


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:,.0f} ms"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engines", default="1,2,4,8,16,32,64", help="comma-separated engine counts")
    parser.add_argument("--policies", default=",".join(POLICIES), help=f"comma-separated, of {POLICIES}")
    parser.add_argument("--rate", type=float, default=0.045, help="new conversations/s per engine")
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of conversation starts")
    parser.add_argument("--warmup", type=float, default=120.0, help="requests before this are not measured")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--system-prompts", type=int, default=8)
    parser.add_argument("--think-s", type=float, default=20.0, help="mean pause between turns")
    parser.add_argument("--batch", type=int, default=8, help="DS_MAX_BATCH_SIZE")
    parser.add_argument("--chunk", type=int, default=512, help="DS_PREFILL_CHUNK_TOKENS")
    parser.add_argument("--cache-tokens", type=int, default=4096, help="DS_PREFIX_CACHE_TOKENS")
    parser.add_argument("--step-ms", type=float, default=3.51, help="decode step, fixed part")
    parser.add_argument("--seq-ms", type=float, default=4.47, help="decode step, per running sequence")
    parser.add_argument("--prefill-ms", type=float, default=2.45, help="per computed prompt token")
    parser.add_argument("--span-ms", type=float, default=0.38, help="per decode step and 1,000 occupied KV cells")
    parser.add_argument("--busy-margin", type=float, default=0.75, help="PrefixRouter busy_margin")
    parser.add_argument(
        "--conversation-ids",
        action="store_true",
        help="send conversation ids to the router (default: prompts only, as plain OpenAI clients)",
    )
    parser.add_argument("--jobs", type=int, default=1, help="worker processes")
    args = parser.parse_args(argv)
    counts = [int(n) for n in args.engines.split(",")]
    policies = [p for p in args.policies.split(",") if p]
    for p in policies:
        if p not in POLICIES:
            parser.error(f"unknown policy {p!r}; choose from {', '.join(POLICIES)}")
    if 1 not in counts:
        counts.insert(0, 1)
    jobs = [(args, n, p) for n in counts for p in (policies if n > 1 else policies[-1:])]
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs) as pool:
            results = list(pool.map(_run, jobs))
    else:
        results = [_run(job) for job in jobs]

    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
    ).stdout.strip()
    print(f"# route_sim: {' '.join(sys.argv[1:]) or '(defaults)'}; commit {commit}; {platform.python_version()}")
    print(
        f"# load: {args.rate} conversations/s per engine, 1-8 turns, think {args.think_s} s; "
        f"costs: step {args.step_ms} + {args.seq_ms}/seq ms, prefill {args.prefill_ms} ms/token, "
        f"batch {args.batch}, cache {args.cache_tokens} tokens, busy_margin {args.busy_margin}"
    )
    single = next(r for r in results if r.engines == 1)
    rr = {r.engines: r for r in results if r.policy == "rr"}
    active = args.rate * single.lifetime_s
    print(
        f"# one engine: {active:.1f} active conversations (rate x mean lifetime {single.lifetime_s:.0f} s), "
        f"{single.footprint:,.0f} tokens per cached turn: all of them ~{active * single.footprint:,.0f} tokens"
    )
    print()
    print(
        "| engines | policy | requests | req/s | out tok/s | TTFT p50 | TTFT p90 | TTFT p99 "
        "| engines busy | prefix-hit | hit vs 1 engine | p99 vs rr |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        base = rr.get(r.engines)
        vs_rr = f"{r.ttft_p99 / base.ttft_p99:.2f}x" if base and r.engines > 1 else "-"
        policy = "(any)" if r.engines == 1 else r.policy
        print(
            f"| {r.engines} | {policy} | {r.requests} | {r.req_s:.2f} | {r.out_tok_s:,.0f} | {_ms(r.ttft_p50)} "
            f"| {_ms(r.ttft_p90)} | {_ms(r.ttft_p99)} | {r.busy:.0%} | {r.hit_rate:.3f} "
            f"| {r.hit_rate / single.hit_rate:.2f}x | {vs_rr} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
