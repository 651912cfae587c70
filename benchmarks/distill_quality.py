"""Distillation quality lab: do agentkd's methods beat plain imitation at equal teacher cost? Offline.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/distill_quality.py            # full lab, <= 30 min on 2 cores
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/distill_quality.py --quick    # tiny sizes, one seed, ~2 min

1. A teacher whose weights the lab holds: a small causal LM trained on the sim's world (worked answers
   in varied phrasing, and the explainer's reply), on the student's BPE tokenizer, served behind the
   sim's OpenAI-compatible HTTP layer (agentkd.teachers.sim, a plugged-in responder).
2. agentkd teaches through its gateway like any provider: one set of answerer calls (top-5 logprobs on
   every one) shared by sft, posterior_kd, posterior_kd_evidence and proxy_kd; explainer calls of about
   the same tokens for rationale. Same student spec, same optimiser-step budget, 3 seeds each.
3. Held-out figures: accuracy (greedy), exact token KL(teacher || student) on teacher samples, the
   proxy's own, the teacher's own; teacher tokens and USD per method from the run's `calls` table.
4. Lion against random expansion at equal USD on the rule-based sim (loop.selection).
5. benchmarks/quality.md, benchmarks/quality_lion_vs_random.png, benchmarks/quality.json, and the
   JSON object as the last printed line. --quick writes into its work folder instead (never over the
   committed table).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import shlex
import shutil
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import torch  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from agentkd.config import ROLE_DEFAULTS  # noqa: E402
from agentkd.lion.evaluate import answer_number  # noqa: E402
from agentkd.training.students import build_student, count_parameters, load_checkpoint  # noqa: E402
from quality.jobs import KD_METHODS, init_worker, proxy_job, student_job, teacher_job  # noqa: E402
from quality.lion import lion_job, lion_vs_random  # noqa: E402
from quality.measure import accuracy, sample_accuracy, teacher_heldout, token_kl  # noqa: E402
from quality.plan import FULL, METHODS, QUICK, LabSizes, lab_tokenizer, student_spec, teacher_spec, world_split  # noqa: E402
from quality.table import summarise, write_outputs  # noqa: E402
from quality.teaching import explainer_label_accuracy, save_examples, teach_lab  # noqa: E402

TEMPERATURE = ROLE_DEFAULTS["answerer"]["temperature"]  # the answerer's 0.7: what the teacher samples at
TEACH_SEED = 0


def log(message: str, began: float) -> None:
    print(f"[{time.perf_counter() - began:6.0f} s] {message}", file=sys.stderr, flush=True)


def run_lab(sizes: LabSizes, work: Path) -> dict:
    began = time.perf_counter()
    shutil.rmtree(work, ignore_errors=True)
    (work / "taught").mkdir(parents=True)
    split = world_split(sizes)
    lab_tokenizer(split, sizes).save_pretrained(work / "tokenizer")
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=sizes.workers, mp_context=context, initializer=init_worker) as pool:
        # The Lion/random arms need no lab teacher: they run beside the teacher's training.
        teacher_run = pool.submit(teacher_job, work, sizes)
        lion_runs = [pool.submit(lion_job, work, sizes, selection, seed)
                     for seed in sizes.lion_seeds for selection in ("lion", "random")]
        teacher_info = teacher_run.result()
        log(f"teacher trained: {teacher_info['steps']} steps in {teacher_info['seconds']:.0f} s", began)

        teacher = load_checkpoint(work / "teacher", spec=teacher_spec(sizes))
        held = teacher_heldout(teacher, split.heldout, temperature=TEMPERATURE, max_new_tokens=sizes.max_new_tokens,
                               seed=TEACH_SEED)
        held.save(work / "heldout.pt")
        untrained = build_student(student_spec(), tokenizer=teacher.tokenizer, seed=0)
        teacher_info |= {
            "accuracy_greedy": accuracy(teacher, held, max_new_tokens=sizes.max_new_tokens),
            "accuracy_sampled": sample_accuracy(teacher, held), "temperature": TEMPERATURE,
        }
        baseline = {"params": count_parameters(untrained.model),
                    "accuracy": accuracy(untrained, held, max_new_tokens=sizes.max_new_tokens),
                    "kl": token_kl(untrained, held)}

        taught = teach_lab(teacher, split.taught, sizes.taught, work / "teach", seed=TEACH_SEED,
                           max_new_tokens=sizes.max_new_tokens)
        save_examples(taught.answers, work / "taught" / "answers.jsonl")
        save_examples(taught.rationale, work / "taught" / "rationale.jsonl")
        truth = {p.text: p.answer for p in split.taught}
        taught_quality = {
            "answer_accuracy": sum(answer_number(e.response) == truth[e.instruction] for e in taught.answers)
            / max(len(taught.answers), 1),
            "label_accuracy": sum(answer_number(e.label or "") == truth[e.instruction] for e in taught.rationale)
            / max(taught.explainer_rows, 1),  # parse failures count as wrong
        }
        log(f"taught: {len(taught.answers)} answers, {taught.explainer_rows} explainer rows "
            f"({taught.batches} batched decodes)", began)
        del teacher

        proxies = {pool.submit(proxy_job, work, sizes, seed): seed for seed in sizes.seeds}
        pending: set[Future] = set(proxies)
        pending |= {pool.submit(student_job, work, sizes, m, seed) for seed in sizes.seeds for m in ("sft", "rationale")}
        kshot = explainer_label_accuracy(split.taught[: sizes.kshot_rows], work / "kshot", seed=TEACH_SEED)
        proxy_results, student_results = [], []
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                result = future.result()
                if future in proxies:
                    proxy_results.append(result)
                    pending |= {pool.submit(student_job, work, sizes, m, proxies[future]) for m in KD_METHODS}
                    log(f"proxy seed {result['seed']}: {result['steps']} steps, accuracy {result['accuracy']:.3f}", began)
                else:
                    student_results.append(result)
                    log(f"{result['method']} seed {result['seed']}: accuracy {result['accuracy']:.3f}, "
                        f"kl {result['kl'] if result['kl'] is None else round(result['kl'], 4)}", began)
        lion_results = [f.result() for f in lion_runs]
    return summarise(
        sizes=sizes, teacher=teacher_info, baseline=baseline, taught=taught, taught_quality=taught_quality,
        proxies=proxy_results,
        students=student_results, lion=lion_vs_random(lion_results), kshot=kshot, methods=METHODS,
        seconds=time.perf_counter() - began,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one seed (a correctness run, not figures)")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default runs/quality[-quick])")
    parser.add_argument("--out", type=Path, default=None,
                        help="where quality.md/.json/.png go (default benchmarks/; --quick: the work folder)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    hf_logging.disable_progress_bar()
    sizes = QUICK if args.quick else FULL
    root = HERE.parent
    work = (args.work or root / "runs" / ("quality-quick" if args.quick else "quality")).resolve()
    out = (args.out or (work if args.quick else HERE)).resolve()
    figures = run_lab(sizes, work)
    command = "python benchmarks/distill_quality.py" + "".join(f" {shlex.quote(a)}" for a in sys.argv[1:])
    machine = {"platform": platform.platform(), "python": platform.python_version(), "cpu_cores": os.cpu_count(),
               "torch": torch.__version__}
    print(write_outputs(figures, out, command=command, machine=machine), flush=True)


if __name__ == "__main__":
    main()
