"""Benchmark: decode step and throughput at tensor_parallel_size 1 and 2 on Llama-3.1-8B shapes (dummy bf16 weights).

A batch of ``--batch`` sequences (default 32) is prefilled, then decoded together; the decode step time is the
median of the engine's steps in which every sequence decodes one token (``LLMEngine.step``, scheduling and
sampling included, as the server runs them), and the throughput is output tokens over the whole run. TP 2 runs only
where at least two GPUs are visible (else single-GPU numbers only; the JSON says which). The issue's target: the
TP 2 decode step at most 0.6x TP 1's at batch 32.

    python bench/gpu/tp.py [--model llama-3.1-8b] [--batch 32] [--prompt-len 256] [--output-len 64]
    python bench/gpu/tp.py --smoke     # a tiny shape on the CPU, TP 1 and TP 2 over gloo; numbers mean nothing
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpubench

# at import, not in main(): a spawned tensor-parallel worker re-imports this script before it unpickles its target,
# and on a bare GPU machine (no pip install) that is what makes `kubellm` importable there
gpubench.ensure_kubellm()


def run_tp(source: str, tp: int, args: Any, device: Any) -> dict[str, Any]:
    import torch

    from kubellm.runtime.llm import LLM
    from kubellm.runtime.sampling_params import SamplingParams

    started = time.perf_counter()
    llm = LLM(
        model=source, load_format="dummy", max_model_len=args.prompt_len + args.output_len + 16,
        max_num_seqs=args.batch, max_num_batched_tokens=max(2048, args.prompt_len), enable_prefix_caching=False,
        tensor_parallel_size=tp, **gpubench.engine_options(args),
    )  # fmt: skip
    load_s = time.perf_counter() - started
    engine: Any = llm.engine
    try:
        vocab = engine.model_config.vocab_size
        gen = torch.Generator().manual_seed(0)
        params = SamplingParams(max_tokens=args.output_len, ignore_eos=True, temperature=0.0)
        llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up
        for i in range(args.batch):
            prompt = torch.randint(0, vocab, (args.prompt_len,), generator=gen).tolist()
            engine.add_request(f"tp-{i}", prompt, params)
        decode_ms: list[float] = []
        generated = 0
        start = time.perf_counter()
        while engine.has_unfinished_requests():
            sched = engine.scheduler
            decodes_all = (
                sched.num_running == args.batch
                and not sched.waiting
                and all(s.num_tokens - s.num_computed_tokens == 1 for s in sched.running)
            )
            t0 = time.perf_counter()
            outputs = engine.step()
            gpubench.sync(device)
            elapsed = (time.perf_counter() - t0) * 1e3
            generated += sum(len(c.token_ids) for o in outputs for c in o.outputs)
            if decodes_all:
                decode_ms.append(elapsed)
        total_s = time.perf_counter() - start
        weights = gpubench.weight_bytes(engine.model)  # rank 0's shard
    finally:
        engine.runner.shutdown()
    if not decode_ms:
        raise SystemExit(f"TP {tp}: no step decoded the whole batch of {args.batch}")
    return {
        "tensor_parallel_size": tp,
        "decode_step_ms_median": statistics.median(decode_ms),
        "decode_steps": len(decode_ms),
        "output_tokens": generated,
        "output_tokens_per_s": generated / total_s,
        "total_s": total_s,
        "model_load_s": load_s,
        "rank0_weight_bytes": weights,
    }


def main() -> int:
    parser = gpubench.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-3.1-8b", help="a loader preset (dummy weights)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=64)
    args = parser.parse_args()
    if args.smoke:
        args.batch, args.prompt_len, args.output_len = 4, 8, 4
    device = gpubench.setup(args)
    import torch

    sizes = [1, 2] if args.smoke or torch.cuda.device_count() >= 2 else [1]
    with tempfile.TemporaryDirectory() as workdir:
        source, hf = gpubench.model_source(args.model, args.smoke, Path(workdir))
        runs = [run_tp(source, tp, args, device) for tp in sizes]
    results: dict[str, Any] = {"runs": runs, "gpus_visible": torch.cuda.device_count()}
    if len(runs) == 2:
        ratio = runs[1]["decode_step_ms_median"] / runs[0]["decode_step_ms_median"]
        results["tp2_over_tp1_decode_step"] = ratio
        results["target_tp2_over_tp1_at_most"] = 0.6
    else:
        results["note"] = "one GPU visible: TP 1 only"
    workload = {
        "model": args.model, "weights": "dummy", "dtype": gpubench.engine_options(args)["dtype"],
        "batch": args.batch, "prompt_len": args.prompt_len, "output_len": args.output_len,
        "num_layers": hf["num_hidden_layers"], "hidden_size": hf["hidden_size"],
        "num_heads": hf["num_attention_heads"], "num_kv_heads": hf["num_key_value_heads"],
    }  # fmt: skip
    path = gpubench.write_result("tp", args, device, workload, results)
    print(f"wrote {path}")
    gpubench.print_table(
        ["TP", "decode step ms", "output tok/s", "load s"],
        [[r["tensor_parallel_size"], r["decode_step_ms_median"], r["output_tokens_per_s"], r["model_load_s"]]
         for r in runs],
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
