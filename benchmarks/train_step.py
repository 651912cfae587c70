"""Student step time per objective on the tiny student, same batch (forward + loss + backward + AdamW),
and posterior KD target building at Qwen2.5's vocabulary.

Prints one line per objective, then a JSON object as the last line: tokens_per_s per objective,
posterior_over_sft (target <= 1.3: the posterior_kd step plus its target building amortised per step —
targets are built once per training call and reused every epoch, so one batch's build time is divided by
TrainSection().epochs — over the sft step; posterior_over_sft_raw leaves the build out). posterior_kd is
measured as train() runs it by default: KD targets from the larger proxy on the rows in proxy_split's kd
role, NLL on the others; posterior_over_sft_every_row is the same with a KD term on every row. Then the bytes of the
sparse posterior targets vs a dense-vocabulary equivalent, and "vocab_151936": peak host memory and
seconds of building targets for 32 x 1,024 response positions with a Qwen2-architecture q model at
V = 151,936 (built from a config, tiny hidden size), measured in a fresh subprocess (target <= 1 GiB),
next to the dense (B, T, V) fp32 size. The sft baseline is measured in the same run.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/train_step.py [--steps 30] [--batch 32] [--skip-vocab]
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from agentkd.training import train as trainer  # noqa: E402
from agentkd.config import TrainSection  # noqa: E402
from agentkd.training.ngram import NGramPrior  # noqa: E402
from agentkd.training.posterior import fit_prior, posterior_targets  # noqa: E402
from agentkd.training.proxy import proxy_targets  # noqa: E402
from agentkd.training.students import build_student, load_spec  # noqa: E402
from agentkd.training.train_data import EncodedRow, TrainingExample, encode_pair, format_prompt  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
QWEN_V = 151_936  # Qwen2.5's vocabulary


def problems(n: int, seed: int = 0) -> list[TrainingExample]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        text = f"Ann has {a} pens and buys {b} more. How many pens does Ann have now?"
        answer = f"{a} + {b} = {a + b}. The answer is {a + b}."
        out.append(TrainingExample(text, answer, label=str(a + b), rationale=answer))
    return out


def time_steps(model, cases: dict, steps: int, warmup: int) -> dict[str, tuple[float, int]]:
    """Median seconds per step and tokens per batch for each case (rows, step_loss). The cases take turns,
    one step each, every case on its own copy of the same starting weights with its own AdamW: load on a
    shared machine then slows every case alike instead of whichever ran during a busy moment."""
    runs = {}
    for name in cases:
        m = copy.deepcopy(model).train()
        params = [p for p in m.parameters() if p.requires_grad]
        runs[name] = (m, params, torch.optim.AdamW(params, lr=1e-4), [])
    tokens = {}
    for i in range(warmup + steps):
        for name, (rows, step_loss) in cases.items():
            m, params, opt, times = runs[name]
            t0 = time.perf_counter()
            loss, tokens[name] = step_loss(m, rows)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    return {name: (statistics.median(runs[name][3]), tokens[name]) for name in cases}


def build_targets(q_model, tok, exs, encoded, cfg, picked: list[int]) -> tuple[list, float]:
    """One batch's target build as train() does it (fit_prior on the batch's answers + posterior_targets on
    the rows in `picked`), placed back into the batch with None (NLL only) elsewhere: the targets and the
    median seconds of 3 warm builds (the first call in a process also pays torch's one-time start-up)."""
    times = []
    for _ in range(4):
        t0 = time.perf_counter()
        prior = fit_prior(tok, [e.response for e in exs], cfg, q_model.config.vocab_size)
        targets, _ = posterior_targets(q_model, tok, [exs[i] for i in picked], [encoded[i] for i in picked], prior,
                                       cfg, torch.device("cpu"))
        times.append(time.perf_counter() - t0)
    return trainer._placed(picked, targets, len(exs), None), statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--skip-vocab", action="store_true", help="leave out the V = 151,936 target build")
    parser.add_argument("--vocab-case", action="store_true", help=argparse.SUPPRESS)  # the fresh subprocess
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.vocab_case:
        print(json.dumps(vocab_case(args.batch, 1024)))
        return
    torch.manual_seed(0)
    exs = problems(args.batch)
    corpus = [format_prompt(e.instruction) + e.response for e in exs]
    student = build_student(load_spec(ROOT / "students/tiny.toml"), corpus=corpus)
    proxy = build_student(load_spec(ROOT / "students/tiny-proxy.toml"), tokenizer=student.tokenizer, seed=1)
    tok, cfg = student.tokenizer, TrainSection()
    encoded = [encode_pair(tok, format_prompt(e.instruction), e.response, cfg.max_len) for e in exs]
    cpu = torch.device("cpu")

    # posterior_kd as train() runs it by default: q is the (larger) proxy, and only the rows in the proxy
    # split's kd role get a KD term (the others trained the proxy: its q on them would be memorised)
    kd_rows, every_row = trainer._kd_rows(exs, cfg), list(range(len(exs)))
    post, post_s = build_targets(proxy.model, tok, exs, encoded, cfg, kd_rows)
    post_all, post_all_s = build_targets(proxy.model, tok, exs, encoded, cfg, every_row)  # KD on every row
    _, self_s = build_targets(copy.deepcopy(student.model), tok, exs, encoded, cfg, every_row)  # posterior_q "self"
    ptargets, weights = proxy_targets(proxy.model, encoded, cfg, cpu, pad_id=tok.pad_token_id)
    rationale_rows = [
        (encode_pair(tok, format_prompt(e.instruction, "predict"), e.label, cfg.max_len),
         encode_pair(tok, format_prompt(e.instruction, "explain"), e.rationale, cfg.max_len))
        for e in exs
    ]
    cases = {
        "sft": (encoded, trainer._sft_step),
        "rationale": (rationale_rows, trainer._rationale_step(cfg.rationale_alpha)),
        "posterior_kd": (list(zip(encoded, post)), trainer._posterior_step(cfg.kd_lambda)),
        "posterior_kd_every_row": (list(zip(encoded, post_all)), trainer._posterior_step(cfg.kd_lambda)),
        "proxy_kd": (list(zip(encoded, ptargets, weights.tolist())), trainer._proxy_kd_step(cfg.kd_lambda)),
    }
    step_s, tps = {}, {}
    for name, (seconds, tokens) in time_steps(student.model, cases, args.steps, args.warmup).items():
        step_s[name], tps[name] = seconds, tokens / seconds
        print(f"{name:22s} step {step_s[name] * 1e3:7.2f} ms  {tps[name]:9,.0f} tokens/s  ({tokens} tokens/batch)")

    def amortise(case: str, build_s: float) -> float:
        return step_s[case] + build_s / cfg.epochs
    amortised = amortise("posterior_kd", post_s)
    print(f"posterior_kd as train() runs it by default ({len(kd_rows)} of {args.batch} rows in the kd role of "
          f"proxy_split {cfg.proxy_split}: KD there, NLL on the rest) with target building amortised: step "
          f"{step_s['posterior_kd'] * 1e3:.2f} ms + build {post_s * 1e3:.2f} ms / {cfg.epochs:g} epochs (targets are "
          f"built once per training call and reused every epoch; build = fit_prior + posterior_targets, median of 3 "
          f"warm builds) = {amortised * 1e3:.2f} ms per step: {amortised / step_s['sft']:.3f}x sft; without the build "
          f"{step_s['posterior_kd'] / step_s['sft']:.3f}x")
    amortised_all = amortise("posterior_kd_every_row", post_all_s)
    print(f"  KD on every row (build {post_all_s * 1e3:.2f} ms): {amortised_all / step_s['sft']:.3f}x sft; "
          f"without the build {step_s['posterior_kd_every_row'] / step_s['sft']:.3f}x")
    amortised_self = amortise("posterior_kd_every_row", self_s)
    print(f"  KD on every row with a student-sized q (posterior_q = \"self\"): build {self_s * 1e3:.2f} ms, "
          f"{amortised_self / step_s['sft']:.3f}x sft")
    big = None
    if not args.skip_vocab:
        cmd = [sys.executable, __file__, "--vocab-case", "--batch", str(args.batch)]
        cmd += ["--threads", str(args.threads)] if args.threads else []
        big = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
        print(f"V={QWEN_V:,} targets for {args.batch} x 1,024 response positions (Qwen2 config, hidden 32, 2 layers): "
              f"peak host {big['targets_peak_host_bytes'] / 2**20:,.0f} MiB (ru_maxrss after the build minus RSS just "
              f"before it, fresh process: an upper bound) in {big['targets_seconds']:.1f} s; dense (B, T, V) fp32 "
              f"would be {big['dense_bytes'] / 2**30:.1f} GiB")
    vocab = student.model.config.vocab_size
    positions = sum(t.ids.size(0) for t in post_all)
    sparse_bytes = sum(t.nbytes() for t in post_all)
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
        "posterior_over_sft": round(amortised / step_s["sft"], 3),
        "posterior_over_sft_raw": round(step_s["posterior_kd"] / step_s["sft"], 3),
        "posterior_build_s_per_batch": round(post_s, 4),
        "posterior_kd_rows": len(kd_rows),
        "posterior_over_sft_every_row": round(amortised_all / step_s["sft"], 3),
        "posterior_over_sft_every_row_raw": round(step_s["posterior_kd_every_row"] / step_s["sft"], 3),
        "posterior_over_sft_student_sized_q": round(amortised_self / step_s["sft"], 3),
        "amortised_over_epochs": cfg.epochs,
        "proxy_kd_over_sft": round(step_s["proxy_kd"] / step_s["sft"], 3),
        "posterior_targets_bytes_sparse": sparse_bytes,
        "posterior_targets_bytes_dense": dense_bytes,
        "posterior_target_positions": positions,
        "vocab_151936": big,
    }))


def vocab_case(batch: int, positions: int) -> dict:
    """Posterior targets for batch x positions response positions with a Qwen2-architecture q model at
    V = 151,936 (hidden 32, 2 layers: the LM head is what V costs). No Qwen tokenizer is offline, so the
    rows are Zipf-distributed ids and the prior is fitted on them directly; no row carries provider logprobs,
    so the tokenizer is never consulted. Peak host memory: ru_maxrss after the build minus the current RSS
    just before it (an upper bound on what the build adds; torch's CPU allocations are included)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    q_model = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=QWEN_V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=2048, tie_word_embeddings=True,
    )).eval()
    g = np.random.default_rng(0)
    eos, prompt = 2, [5] * 16
    responses = [g.zipf(1.2, positions - 1).clip(max=QWEN_V - 1).tolist() for _ in range(batch)]
    rows = [EncodedRow(prompt + r + [eos], [-100] * len(prompt) + r + [eos], len(prompt)) for r in responses]
    cfg = TrainSection()
    prior = NGramPrior.fit([r + [eos] for r in responses], n=cfg.ngram_n, vocab_size=QWEN_V, add_k=cfg.ngram_add_k,
                           top_k=cfg.prior_top_k)
    exs = [TrainingExample("x", "y")] * batch
    gc.collect()
    before = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")  # current RSS
    t0 = time.perf_counter()
    targets, _ = posterior_targets(q_model, None, exs, rows, prior, cfg, torch.device("cpu"))
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    return {
        "targets_peak_host_bytes": peak - before, "targets_seconds": round(seconds, 2),
        "dense_bytes": batch * positions * QWEN_V * 4, "targets_bytes": sum(t.nbytes() for t in targets),
        "positions": sum(t.ids.size(0) for t in targets), "support_width": targets[0].ids.size(1),
        "rss_before_bytes": before, "measure": "ru_maxrss after - RSS before, fresh subprocess",
    }


if __name__ == "__main__":
    main()
