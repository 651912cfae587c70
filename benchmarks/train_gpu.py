"""Training throughput on one GPU: a Qwen2-architecture ~0.5B student built from a config (Qwen2.5-0.5B's
shape, no download), sft and posterior_kd, full fine-tuning and LoRA, through agentkd's own optimisation
loop (optimise.py: bf16 autocast, AdamW, clipping) and step functions (train.py).

Per case: tokens/s (non-padding input tokens per second of optimiser steps, after warm-up steps), model
FLOPs utilisation (MFU) against the GPU's dense bf16 peak, and peak GPU memory. Model FLOPs per token
(PaLM's appendix B convention): 6 N + 12 L d T for full training, 4 N + 12 L d T for LoRA (no weight
gradients for the frozen matrices; the adapter's own FLOPs are left out), N the matmul parameters (the LM
head included, the embedding lookup not), L layers, d the hidden size, T the sequence length. The
posterior_kd rows carry random sparse targets of the real support width (1 + top_k + prior_top_k); target
building is measured apart (the q model is the same architecture), in positions per second.

Without CUDA it prints why and a JSON object with "skipped" and exits 0. --smoke runs every case on a
tiny Qwen2 config on whatever device there is (CPU too; its figures mean nothing): a test that the
script works where no GPU is.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/train_gpu.py [--batch 8] [--seq 1024] [--steps 10]
        [--peak-tflops 989] [--gradient-checkpointing] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

# Dense bf16 peak TFLOPS (no sparsity) by device name; --peak-tflops for anything else.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0}
QWEN_05B = dict(vocab_size=151_936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32_768,
                rope_theta=1_000_000.0, tie_word_embeddings=True)
TINY = dict(QWEN_05B, vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8, help="sequences per step")
    parser.add_argument("--seq", type=int, default=1024, help="tokens per sequence (half prompt, half response)")
    parser.add_argument("--steps", type=int, default=10, help="timed optimiser steps per case")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (kernels, allocator)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--cases", default="sft/full,sft/lora,posterior_kd/full,posterior_kd/lora")
    parser.add_argument("--smoke", action="store_true", help="a tiny Qwen2 config on any device (a test)")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        print("train_gpu: no CUDA device here; nothing measured (run it on a machine with a GPU)")
        print(json.dumps({"skipped": "no CUDA device"}))
        return
    args.shape = TINY if args.smoke else QWEN_05B
    args.device = "cuda" if cuda else "cpu"
    name = torch.cuda.get_device_name(0) if cuda else "cpu"
    peak = None if args.smoke else args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    results = {}
    for case in args.cases.split(","):
        objective, mode = case.split("/")
        results[case] = run_case(objective, mode == "lora", args, peak)
        r = results[case]
        mfu = "n/a (pass --peak-tflops)" if r["mfu"] is None else f"{r['mfu']:.1%}"
        print(f"{case:18s} {r['tokens_per_s']:>10,.0f} tokens/s  MFU {mfu}  peak memory {r['peak_gib']:.1f} GiB",
              flush=True)
    results["parameters"] = args.parameters
    results["posterior_targets"] = target_case(args)
    print(f"posterior targets  {results['posterior_targets']['positions_per_s']:>10,.0f} positions/s (q = the same "
          f"architecture, bf16)", flush=True)
    print(json.dumps({"device": name, "smoke": args.smoke, "parameters": results.pop("parameters"),
                      "peak_tflops": peak, "batch": args.batch, "seq": args.seq, "steps": args.steps,
                      "gradient_checkpointing": args.gradient_checkpointing, **results}))


def build_model(shape: dict, device: str, lora: bool):
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**shape, pad_token_id=0)).to(device)
    if lora:  # agentkd's LoRA defaults (train.lora), r = 16
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj",
                                                                                       "o_proj"], task_type="CAUSAL_LM"))
    return model


def model_flops_per_token(model, shape: dict, seq: int, lora: bool) -> float:
    """6N + 12 L d T (full) or 4N + 12 L d T (LoRA). N = the base model's matrices: the tied embedding
    counted once, as the LM head's matmul (its lookup costs no FLOPs); norms and biases left out."""
    base = model.get_base_model() if lora else model
    n = sum(p.numel() for name, p in base.named_parameters() if "lora_" not in name and p.dim() == 2)
    return (4 if lora else 6) * n + 12 * shape["num_hidden_layers"] * shape["hidden_size"] * seq


def rows_for(objective: str, args) -> list:
    from agentkd.training.objectives import SparseTargets
    from agentkd.training.train_data import EncodedRow

    g = torch.Generator().manual_seed(0)
    V, half = args.shape["vocab_size"], args.seq // 2
    rows = []
    for _ in range(args.batch * (args.steps + args.warmup)):
        ids = torch.randint(3, V, (args.seq,), generator=g).tolist()
        row = EncodedRow(ids, [-100] * half + ids[half:], half)
        if objective == "sft":
            rows.append(row)
            continue
        width = 1 + 16 + 8  # TrainSection's top_k + prior_top_k, plus the teacher's token
        probs = torch.rand(args.seq - half, width, generator=g)
        probs = probs / probs.sum(-1, keepdim=True) * 0.9
        target = SparseTargets(ids=torch.randint(3, V, (args.seq - half, width), generator=g, dtype=torch.int32),
                               probs=probs, tail=torch.full((args.seq - half,), 0.1))
        rows.append((row, target))
    return rows


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_case(objective: str, lora: bool, args, peak: float | None) -> dict:
    from agentkd.training import train as trainer
    from agentkd.config import TrainSection
    from agentkd.training.optimise import make_accelerator, optimise, sft_step

    model = build_model(args.shape, args.device, lora)
    cfg = TrainSection(batch_size=args.batch, warmup_steps=0, lr=1e-5, gradient_checkpointing=args.gradient_checkpointing)
    step = sft_step if objective == "sft" else trainer._posterior_step(1.0)
    rows = rows_for(objective, args)
    accelerator = make_accelerator(cfg)  # bf16 autocast on CUDA
    common = dict(pad_id=0, epochs=1e9, max_seconds=None, seed=0, log_metric=None, progress=False)
    optimise(model, rows[: args.batch * args.warmup], step, cfg, accelerator, max_steps=args.warmup, name="warmup",
             **common)
    _sync(args.device)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    began = time.perf_counter()
    stats = optimise(model, rows[args.batch * args.warmup :], step, cfg, accelerator, max_steps=args.steps,
                     name="timed", **common)
    _sync(args.device)
    seconds = time.perf_counter() - began
    tokens = args.batch * args.seq * stats["steps"]  # no padding: every row is seq tokens
    flops = model_flops_per_token(model, args.shape, args.seq, lora) * tokens
    out = {"tokens_per_s": tokens / seconds, "seconds": round(seconds, 3), "steps": stats["steps"],
           "final_loss": stats["final_loss"], "model_tflops_per_s": flops / seconds / 1e12,
           "mfu": None if peak is None else flops / seconds / (peak * 1e12),
           "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else 0.0,
           "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    args.parameters = sum(p.numel() for name, p in model.named_parameters() if "lora_" not in name)
    del model
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return out


def target_case(args) -> dict:
    """posterior_targets for batch x seq/2 response positions, q = the same architecture, bf16 on CUDA."""
    from agentkd.config import TrainSection
    from agentkd.training.ngram import NGramPrior
    from agentkd.training.optimise import make_accelerator
    from agentkd.training.posterior import posterior_targets
    from agentkd.training.train_data import TrainingExample

    q = build_model(args.shape, args.device, lora=False).eval()
    rows = rows_for("sft", args)[: args.batch]
    cfg = TrainSection()
    prior = NGramPrior.fit([r.input_ids[r.start :] for r in rows], n=cfg.ngram_n, vocab_size=args.shape["vocab_size"],
                           add_k=cfg.ngram_add_k, top_k=cfg.prior_top_k)
    exs = [TrainingExample("x", "y")] * len(rows)
    accelerator = make_accelerator(cfg)
    with accelerator.autocast():
        posterior_targets(q, None, exs, rows, prior, cfg, accelerator.device)  # warm-up
        _sync(args.device)
        began = time.perf_counter()
        targets, _ = posterior_targets(q, None, exs, rows, prior, cfg, accelerator.device)
        _sync(args.device)
    seconds = time.perf_counter() - began
    positions = sum(t.ids.size(0) for t in targets)
    return {"positions": positions, "seconds": round(seconds, 3), "positions_per_s": positions / seconds}


if __name__ == "__main__":
    main()
