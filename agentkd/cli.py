"""The `agentkd` command. Exit codes: 0 done; 2 bad config or input; 3 budget exhausted (resumable);
4 provider refused (auth, quota); 5 a role's replies unusable (fail_fast; resumable); 6 batches submitted,
results pending (batch.wait = false: the same command collects them); 130 interrupted (resumable)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

from rich.console import Console

from agentkd.batches import BatchesPending
from agentkd.gateway.budget import BudgetExhausted
from agentkd import watch
from agentkd.config import ConfigError, load_config
from agentkd.process import freeze_startup_heap
from agentkd.roles.inputs import fields_help, read_role_rows
from agentkd.roles.replies import UnusableReplies
from agentkd.roles.template import TemplateError
from agentkd.store.writer import StoreError, StoreLockedError
from agentkd.teachers.base import AuthError, QuotaExceeded
from agentkd.terminal import labelled, plain_console

EXIT_OK, EXIT_BAD_INPUT, EXIT_BUDGET, EXIT_REFUSED, EXIT_INTERRUPTED = 0, 2, 3, 4, 130
EXIT_UNUSABLE = 5  # a role's replies were unusable past fail_fast.max_share
EXIT_BATCHES_PENDING = 6  # batch.wait = false: every batch submitted, its results not yet collected
ROLES = ("answerer", "explainer", "referee", "generator")
GENERATOR_MODES = ("hard", "easy", "plain")  # Lion's two prompts, and the random-expansion baseline's


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="agentkd", description="Distil a closed teacher LLM into a small student.")
    sub = parser.add_subparsers(dest="command", required=True)

    def config_command(name: str, help_text: str, **extra) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, **extra)
        p.add_argument("config", type=Path, help="run config (TOML)")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value, e.g. --set budget.usd=5 (repeatable)")
        return p

    run = config_command("run", "the whole loop: imitate -> discriminate -> generate; resumes")
    run.add_argument("--no-progress", action="store_true")

    teach = config_command("teach", "one role over a JSONL dataset through the gateway; resumable",
                           epilog=fields_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    teach.add_argument("--role", choices=ROLES, required=True)
    teach.add_argument("--input", type=Path, required=True, help="JSONL, one object per line")
    teach.add_argument("--output", type=Path, required=True)
    teach.add_argument("--rationale-rate", type=float, default=None,
                       help="explainer: share of rows asked for a rationale (default loop.rationale_rate)")
    teach.add_argument("--mode", choices=GENERATOR_MODES, default="hard", help="generator prompt")
    teach.add_argument("--no-progress", action="store_true")

    estimate = config_command("estimate", "dry run: calls, tokens and USD; nothing is sent",
                              epilog=fields_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    estimate.add_argument("--role", choices=ROLES, default="answerer")
    estimate.add_argument("--input", type=Path, help="JSONL to estimate `teach` over")
    estimate.add_argument("--rationale-rate", type=float, default=None)
    estimate.add_argument("--mode", choices=GENERATOR_MODES, default="hard", help="generator prompt")

    train = config_command("train", "train the student from what the run stored")
    train.add_argument("--objective", choices=("sft", "rationale", "posterior_kd", "proxy_kd"))
    train.add_argument("--iteration", type=int, default=None, help="train on data up to this iteration")
    train.add_argument("--job", type=Path, default=None,
                       help="a job folder `agentkd run` wrote for a launched proxy/train stage (train.num_processes > 1)")

    report = sub.add_parser("report", help="write RUN_DIR/report.md and plots")
    report.add_argument("run_dir", type=Path)
    export = sub.add_parser("export", help="export the training data")
    export.add_argument("run_dir", type=Path)
    export.add_argument("--format", choices=("jsonl", "parquet"), default="jsonl")
    export.add_argument("--output", type=Path, default=None)
    watch.add_commands(sub)

    evaluate = sub.add_parser("eval", help="the student's answers to a JSONL file, and its accuracy where rows "
                              "give an `answer`")
    evaluate.add_argument("target", type=Path, metavar="RUN_DIR|CHECKPOINT",
                          help="a run folder (its newest checkpoint) or a checkpoint folder")
    evaluate.add_argument("--input", type=Path, required=True,
                          help="JSONL: `instruction` per row, optional `answer` (the expected answer); for a "
                          "label-task run, the item's fields (task.input_fields) and optional `label`")
    evaluate.add_argument("--output", type=Path, default=None, help="answers JSONL (default: stdout)")
    evaluate.add_argument("--max-new-tokens", type=int, default=None, help="default: the run's train.max_new_tokens")
    evaluate.add_argument("--batch-size", type=int, default=64)
    chat = sub.add_parser("chat", help="talk to the student: one instruction per line, or one --prompt")
    chat.add_argument("target", type=Path, metavar="RUN_DIR|CHECKPOINT")
    chat.add_argument("--prompt", default=None, help="answer this one instruction and exit")
    chat.add_argument("--max-new-tokens", type=int, default=None)
    chat.add_argument("--temperature", type=float, default=0.0, help="0: greedy")

    sim = sub.add_parser("sim-teacher", help="serve the simulated teacher (a stand-in, not a real teacher)")
    sim.add_argument("--port", type=int, default=8765)
    sim.add_argument("--config", type=Path, default=None, help="take [sim] settings from this run config")
    sim.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="e.g. --set sim.rpm=600 --set sim.fault_500=0.05")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    console = plain_console()  # messages hold user text (paths, keys, replies): printed verbatim
    try:
        return _dispatch(args, console)
    except (ConfigError, TemplateError, StoreLockedError) as err:
        console.print(labelled("error:", "red", str(err)))
        return EXIT_BAD_INPUT
    except BudgetExhausted as err:
        console.print(labelled("stopped:", "yellow", f"{err}\nEverything answered so far is stored; re-run "
                               f"with a larger budget (e.g. --set budget.usd=...) to continue."))
        return EXIT_BUDGET
    except UnusableReplies as err:
        console.print(err.report(), markup=False, highlight=False)  # teacher text: never markup
        return EXIT_UNUSABLE
    except (AuthError, QuotaExceeded) as err:
        console.print(labelled("the provider refused:", "red", f"{err}. {_key_hint(args)}"))
        return EXIT_REFUSED
    except StoreError as err:
        console.print(labelled("store error:", "red", f"{err}; no further paid calls were sent"))
        return EXIT_BAD_INPUT
    except BatchesPending as err:
        console.print(labelled("waiting for batches:", "yellow", f"{err}; everything answered so far is stored"))
        return EXIT_BATCHES_PENDING
    except KeyboardInterrupt:
        console.print("interrupted: everything answered so far is stored; re-run the same command to resume")
        return EXIT_INTERRUPTED


def _key_hint(args: argparse.Namespace) -> str:
    try:
        config = load_config(args.config, args.overrides)
    except (ConfigError, AttributeError):
        return ""
    env = config.teacher.api_key_env
    return f"Check the key in ${env} and the account's quota." if env else "Check the account's key and quota."


def _dispatch(args: argparse.Namespace, console: Console) -> int:
    if args.command == "sim-teacher":
        from agentkd.config import config_from_dict
        from agentkd.teachers.sim import serve_forever

        config = load_config(args.config, args.overrides) if args.config else config_from_dict(
            _overrides_only(args.overrides), source="--set", overrides=args.overrides)
        serve_forever(config.sim, port=args.port, seed=config.sim.seed or config.run.seed)
        return EXIT_OK

    if args.command in ("report", "export"):
        return _run_dir_command(args, console)
    if args.command in ("eval", "chat"):
        return _student_command(args)
    if args.command in ("status", "runs"):
        return watch.dispatch(args)

    config = load_config(args.config, args.overrides)
    if args.command == "teach":
        from agentkd.teach import teach

        freeze_startup_heap()

        rate = args.rationale_rate if args.rationale_rate is not None else config.loop.rationale_rate
        summary = asyncio.run(teach(config, args.role, args.input, args.output, rationale_rate=rate,
                                    mode=args.mode, show_progress=not args.no_progress, console=console))
        print(summary.line())
        if args.role == "explainer":
            _print_kshot(config, args.input)
        return EXIT_OK
    if args.command == "estimate":
        from agentkd.estimate import estimate

        rate = args.rationale_rate if args.rationale_rate is not None else config.loop.rationale_rate
        print(estimate(config, role=args.role, input_path=args.input, rationale_rate=rate, mode=args.mode))
        return EXIT_OK
    if args.command == "train":
        from agentkd.training.run import train_command

        line = train_command(config, objective=args.objective, iteration=args.iteration, job=args.job)
        if line:  # the main process's (under a launcher the others say nothing)
            print(line)
        return EXIT_OK
    if args.command == "run":
        from agentkd.lion.loop import run_loop

        freeze_startup_heap()

        return run_loop(config, show_progress=not args.no_progress, console=console)
    raise AssertionError(args.command)


def _student_command(args: argparse.Namespace) -> int:
    from agentkd.inference import chat_command, eval_command

    if args.max_new_tokens is not None and args.max_new_tokens <= 0:
        raise ConfigError(f"--max-new-tokens {args.max_new_tokens}: must be positive")
    if args.command == "eval":
        if args.batch_size <= 0:
            raise ConfigError(f"--batch-size {args.batch_size}: must be positive")
        eval_command(args.target, args.input, args.output, max_new_tokens=args.max_new_tokens,
                     batch_size=args.batch_size)
    else:
        if not 0 <= args.temperature <= 2:  # NaN fails this too
            raise ConfigError(f"--temperature {args.temperature}: must be between 0 and 2")
        chat_command(args.target, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    return EXIT_OK


def _overrides_only(overrides: list[str]) -> dict:
    from agentkd.config import apply_overrides

    return apply_overrides({}, overrides)


def _print_kshot(config, input_path: Path) -> None:
    """The zero-shot saving, measured: both shipped explainer prompts rendered over these rows."""
    from agentkd.estimate import explainer_prompt_tokens

    rows = read_role_rows(input_path, "explainer", rationale_rate=1.0, task=config.task)  # as teach read them
    tokens = explainer_prompt_tokens(config, [r["instruction"] for r in rows])
    zero, few = tokens["zero_shot"], tokens["six_shot"]
    per_token = config.price(config.role("explainer").model).input_per_mtok / 1e6
    zero_usd, few_usd = zero * len(rows) * per_token, few * len(rows) * per_token
    print(f"explainer prompt: {zero:.0f} tokens/row zero-shot vs {few:.0f} with 6 worked examples "
          f"(prompts/explainer_6shot.md): input ${zero_usd:.4f} vs ${few_usd:.4f} for {len(rows)} rows "
          f"({1 - zero / few:.0%} saved)")


def _run_dir_command(args: argparse.Namespace, console: Console) -> int:
    if args.command == "report":
        from agentkd.lion.report import write_report

        path = write_report(args.run_dir)
        print(f"wrote {path}")
        return EXIT_OK
    from agentkd.store.export import export_training_data

    path, count = export_training_data(args.run_dir, fmt=args.format, output=args.output)
    print(json.dumps({"output": str(path), "rows": count}))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
