"""Student step time per objective on the tiny student, same batch (forward + loss + backward + AdamW).

Prints one line per objective, then a JSON object as the last line: tokens_per_s per objective,
posterior_over_sft (step-time ratio; target <= 1.3) and the bytes of the sparse posterior targets vs a
dense-vocabulary equivalent. The sft baseline is measured in the same run.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/train_step.py [--steps 30] [--batch 32]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from agentkd import train as trainer  # noqa: E402
from agentkd.config import TrainSection  # noqa: E402
from agentkd.students import build_student, load_spec  # noqa: E402
from agentkd.train_data import TrainingExample, encode_pair, format_prompt  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def problems(n: int, seed: int = 0) -> list[TrainingExample]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        text = f"Ann has {a} pens and buys {b} more. How many pens does Ann have now?"
        answer = f"{a} + {b} = {a + b}. The answer is {a + b}."
        out.append(TrainingExample(text, answer, label=str(a + b), rationale=answer))
    return out


def time_steps(model, rows, step_loss, steps: int, warmup: int) -> tuple[float, int]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    model.train()
    times, tokens = [], 0
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        loss, tokens = step_loss(model, rows)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times), tokens


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    exs = problems(args.batch)
    corpus = [format_prompt(e.instruction) + e.response for e in exs]
    student = build_student(load_spec(ROOT / "students/tiny.toml"), corpus=corpus)
    proxy = build_student(load_spec(ROOT / "students/tiny-proxy.toml"), tokenizer=student.tokenizer, seed=1)
    tok, cfg = student.tokenizer, TrainSection()
    encoded = [encode_pair(tok, format_prompt(e.instruction), e.response, cfg.max_len) for e in exs]
    cpu = torch.device("cpu")

    t0 = time.perf_counter()
    post = trainer.posterior_targets(proxy.model, tok, exs, encoded, [e.response for e in exs], cfg, cpu)
    post_s = time.perf_counter() - t0
    ptargets, weights = trainer.proxy_targets(proxy.model, encoded, cfg, cpu, pad_id=tok.pad_token_id)
    rationale_rows = [
        (encode_pair(tok, format_prompt(e.instruction, "predict"), e.label, cfg.max_len),
         encode_pair(tok, format_prompt(e.instruction, "explain"), e.rationale, cfg.max_len))
        for e in exs
    ]
    cases = {
        "sft": (encoded, trainer._sft_step),
        "rationale": (rationale_rows, trainer._rationale_step(cfg.rationale_alpha)),
        "posterior_kd": (list(zip(encoded, post)), trainer._posterior_step(cfg.kd_lambda)),
        "proxy_kd": (list(zip(encoded, ptargets, weights.tolist())), trainer._proxy_kd_step(cfg.kd_lambda)),
    }
    step_s, tps = {}, {}
    for name, (rows, step_loss) in cases.items():
        step_s[name], tokens = time_steps(student.model, rows, step_loss, args.steps, args.warmup)
        tps[name] = tokens / step_s[name]
        print(f"{name:13s} step {step_s[name] * 1e3:7.2f} ms  {tps[name]:9,.0f} tokens/s  ({tokens} tokens/batch)")

    vocab = student.model.config.vocab_size
    positions = sum(t.ids.size(0) for t in post)
    sparse_bytes = sum(t.nbytes() for t in post)
    dense_bytes = positions * vocab * 4  # float32 over the vocabulary
    per_position_sparse = sparse_bytes / positions
    print(f"posterior targets: {positions} positions, top_k={cfg.top_k}, V={vocab}: sparse {sparse_bytes:,} B vs dense "
          f"{dense_bytes:,} B ({dense_bytes / sparse_bytes:.1f}x); built in {post_s:.2f} s")
    print(f"at Qwen2.5's V=151,936 a dense position is {151936 * 4:,} B vs {per_position_sparse:.0f} B sparse")
    print(json.dumps({
        "device": "cpu", "threads": torch.get_num_threads(), "batch": args.batch,
        "params": sum(p.numel() for p in student.model.parameters()),
        "tokens_per_s": {k: round(v, 1) for k, v in tps.items()},
        "step_ms": {k: round(v * 1e3, 3) for k, v in step_s.items()},
        "posterior_over_sft": round(step_s["posterior_kd"] / step_s["sft"], 3),
        "proxy_kd_over_sft": round(step_s["proxy_kd"] / step_s["sft"], 3),
        "posterior_targets_bytes_sparse": sparse_bytes,
        "posterior_targets_bytes_dense": dense_bytes,
        "posterior_target_positions": positions,
    }))


if __name__ == "__main__":
    main()
