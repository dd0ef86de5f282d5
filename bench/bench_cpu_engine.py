"""The local engine on this CPU: against HF transformers ``generate`` and against the machine's limit.

What it measures, in one process and one run (machines differ in CPU, so only ratios against
baselines measured here mean anything):

1. sqlinfer's engine (``LocalEngine.chat``, vLLM with continuous batching) against HF
   ``generate`` on the same 256 prompts: same model, chat template, dtype (the hardware rule's),
   greedy, same max tokens, HF given the whole batch at once (left padding). Target >= 1.5x.
2. How close the engine gets to this CPU's compute bound. The bound is a measured matmul
   GFLOP/s in the chosen dtype (shapes of the model's own projections, torch on the cores the
   engine is bound to) divided by the model's FLOPs per token (2 x parameters touched per token,
   plus attention over the prompt). Prefill is timed with ``max_tokens=1``; decode is what a
   16-token run adds on top of it. Both are reported as "% of the limit", whatever they are.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("SQLINFER_RESULT_STORE", "off")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import engine.vllm_engine  # noqa: E402,F401  (first: it sets vLLM's log level before vLLM loads)

INSTRUCTION = "Classify the sentiment of this product review as positive or negative. Answer with one word.\n\nReview: "


def prompts(rows: int, tag: str) -> list[str]:
    import duckdb

    reviews = [r[0] for r in duckdb.sql(
        f"SELECT review FROM read_csv('{ROOT / 'examples/data/reviews.csv'}', allow_quoted_nulls = false) "
        f"WHERE review IS NOT NULL AND review <> ''").fetchall()]
    return [f"{INSTRUCTION}{reviews[i % len(reviews)]} ({tag}{i})" for i in range(rows)]


def matmul_gflops(dtype: str, threads: int, hidden: int, intermediate: int) -> float:
    """Best sustained GEMM rate over the model's projection shapes, in GFLOP/s."""
    import torch

    torch.set_num_threads(threads)
    kind = getattr(torch, dtype)
    best = 0.0
    for tokens in (256, 1024):
        for k, n in ((hidden, intermediate), (intermediate, hidden), (hidden, hidden)):
            a, b = torch.randn(tokens, k, dtype=kind), torch.randn(k, n, dtype=kind)
            torch.matmul(a, b)  # warm
            repeats, started = 0, time.perf_counter()
            while time.perf_counter() - started < 0.5:
                torch.matmul(a, b)
                repeats += 1
            best = max(best, 2 * tokens * k * n * repeats / (time.perf_counter() - started) / 1e9)
    return best


def model_flops(config) -> tuple[float, float, float]:
    """FLOPs per prompt token (no LM head: only the last position's logits are computed), per
    generated token (with the LM head), and per token of attention context per layer-token."""
    hidden, layers = config.hidden_size, config.num_hidden_layers
    heads, kv_heads = config.num_attention_heads, getattr(config, "num_key_value_heads", config.num_attention_heads)
    head_dim = hidden // heads
    per_layer = hidden * (hidden + 2 * kv_heads * head_dim) + hidden * hidden + 3 * hidden * config.intermediate_size
    body = 2 * layers * per_layer
    head = 2 * hidden * config.vocab_size
    attention_per_context_token = 4 * layers * hidden  # QK^T and AV, per (query, key) pair
    return body, body + head, attention_per_context_token


def run_hf(model_dir: str, dtype: str, chats: list[list[dict]], max_tokens: int, threads: int) -> tuple[float, int]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.inference_mode():
        model.generate(**tokenizer(texts[:4], return_tensors="pt", padding=True, add_special_tokens=False),
                       max_new_tokens=2, do_sample=False, pad_token_id=tokenizer.pad_token_id)  # warm
        started = time.perf_counter()
        output = model.generate(**batch, max_new_tokens=max_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        elapsed = time.perf_counter() - started
    generated = output[:, batch["input_ids"].shape[1]:]
    produced = int(sum((row != tokenizer.pad_token_id).sum() for row in generated))
    return elapsed, produced


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--repetitions", type=int, default=2)
    parser.add_argument("--dtype", help="override the hardware rule's dtype (both sides)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    from transformers import AutoConfig

    from engine.config import EngineConfig
    from engine.hardware import _parse_id_list, read_cpu_facts
    from engine.model_store import resolve_model
    from engine.types import SamplingOptions
    from engine.vllm_engine import LocalEngine

    config = EngineConfig.for_this_machine(**({"dtype": args.dtype} if args.dtype else {}))
    cpu = read_cpu_facts()
    bind = config.cpu_threads_bind
    threads = len(_parse_id_list(bind)) if bind not in (None, "auto", "nobind") else max(len(cpu.core_cpus) - 1, 1)
    model = resolve_model("smollm2-135m-instruct")
    hf_config = AutoConfig.from_pretrained(model.path)
    print(f"CPU {cpu.model_name} [{', '.join(cpu.shown_features)}], dtype {config.dtype}, {threads} compute threads", flush=True)

    engine = LocalEngine(model, config)
    engine.start()
    chat = lambda texts: [[{"role": "user", "content": t}] for t in texts]  # noqa: E731
    engine.chat(chat(prompts(8, "warm")), SamplingOptions(temperature=0.0, max_tokens=2))

    full, prefill, prompt_tokens, computed, generated = [], [], 0, 0, 0
    for repetition in range(args.repetitions):
        engine.reset_prefix_cache()  # every run computes every prompt token
        batch = chat(prompts(args.rows, f"p{repetition}-"))
        started = time.perf_counter()
        results = engine.chat(batch, SamplingOptions(temperature=0.0, max_tokens=1))
        prefill.append(time.perf_counter() - started)
        prompt_tokens = sum(r.prompt_tokens for r in results)
        # Prompts share the instruction, which the engine computes once per batch: only the
        # tokens it computed count against the compute bound.
        computed = prompt_tokens - sum(r.cached_tokens for r in results)
        engine.reset_prefix_cache()
        started = time.perf_counter()
        results = engine.chat(batch, SamplingOptions(temperature=0.0, max_tokens=args.max_tokens))
        full.append(time.perf_counter() - started)
        generated = sum(r.completion_tokens for r in results)
        assert all(r.error is None for r in results)
    engine.close()

    hf_runs = [run_hf(str(model.path), config.dtype, chat(prompts(args.rows, f"h{r}-")), args.max_tokens, threads)
               for r in range(args.repetitions)]
    hf_seconds = statistics.median(t for t, _ in hf_runs)
    hf_generated = statistics.median(n for _, n in hf_runs)

    ours_seconds, prefill_seconds = statistics.median(full), statistics.median(prefill)
    decode_seconds = max(ours_seconds - prefill_seconds, 1e-9)
    gflops = matmul_gflops(config.dtype, threads, hf_config.hidden_size, hf_config.intermediate_size)
    per_prompt_token, per_generated_token, attention = model_flops(hf_config)
    mean_prompt = prompt_tokens / args.rows
    prefill_flops = computed * (per_prompt_token + attention * mean_prompt / 2)
    decode_flops = (generated - args.rows) * (per_generated_token + attention * (mean_prompt + args.max_tokens / 2))
    prefill_rate, decode_rate = computed / prefill_seconds, (generated - args.rows) / decode_seconds
    prefill_limit = gflops * 1e9 / (prefill_flops / computed)
    decode_limit = gflops * 1e9 / (decode_flops / max(generated - args.rows, 1))
    result = {
        "benchmark": "local engine vs HF generate (CPU)",
        "cpu": cpu.model_name, "features": list(cpu.shown_features), "dtype": config.dtype, "threads": threads,
        "rows": args.rows, "max_tokens": args.max_tokens,
        "ours_seconds": ours_seconds, "ours_rows_per_s": args.rows / ours_seconds, "ours_generated_tokens": generated,
        "hf_seconds": hf_seconds, "hf_rows_per_s": args.rows / hf_seconds, "hf_generated_tokens": hf_generated,
        "ratio": hf_seconds / ours_seconds, "target": 1.5,
        "matmul_gflops": gflops, "prompt_tokens": prompt_tokens, "computed_prompt_tokens": computed,
        "prefill_tokens_per_s": prefill_rate, "prefill_limit_tokens_per_s": prefill_limit,
        "prefill_percent_of_limit": 100 * prefill_rate / prefill_limit,
        "decode_tokens_per_s": decode_rate, "decode_limit_tokens_per_s": decode_limit,
        "decode_percent_of_limit": 100 * decode_rate / decode_limit,
    }
    print(f"{args.rows} chats, greedy, {args.max_tokens} tokens, {config.dtype}, median of {args.repetitions}:")
    print(f"  sqlinfer engine : {ours_seconds:7.2f} s  {result['ours_rows_per_s']:6.2f} rows/s  ({generated} tokens)")
    print(f"  HF generate     : {hf_seconds:7.2f} s  {result['hf_rows_per_s']:6.2f} rows/s  ({hf_generated:.0f} tokens)")
    print(f"  ratio {result['ratio']:.2f}x ({'meets' if result['ratio'] >= 1.5 else 'MISSES'} target >= 1.5x)")
    print(f"  matmul {gflops:.1f} GFLOP/s in {config.dtype} on {threads} threads")
    print(f"  prompt tokens {prompt_tokens}, of which computed {computed} (the rest: the shared instruction, cached)")
    print(f"  prefill {prefill_rate:8.0f} tok/s of a {prefill_limit:8.0f} tok/s limit: {result['prefill_percent_of_limit']:.0f}%")
    print(f"  decode  {decode_rate:8.0f} tok/s of a {decode_limit:8.0f} tok/s limit: {result['decode_percent_of_limit']:.0f}%")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
