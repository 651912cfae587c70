"""`agentkd eval` and `agentkd chat`: use a trained student without reading the source.

TARGET is a run folder (its newest checkpoints/<iteration>/) or a checkpoint folder. The prompt
format comes from the checkpoint's chat template (train_data.chat_template), so what these commands
send is what transformers or vLLM send with the same folder. Scoring uses the run's [task] kind when the
checkpoint lies in a run folder (arithmetic: the final number), else an exact, case-blind match.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from pydantic import ValidationError

from agentkd.config import ConfigError, TrainSection
from agentkd.datasets import read_jsonl, write_jsonl
from agentkd.decode import generate_answers
from agentkd.evaluate import is_correct
from agentkd.students import SPEC_FILE, Student, StudentSpec, load_checkpoint
from agentkd.train_data import Task, checkpoint_task

DEFAULT_MAX_NEW_TOKENS = TrainSection().max_new_tokens  # the loop's decoding cap, unless the run set another


@dataclass
class LoadedStudent:
    student: Student
    checkpoint: Path
    task: Task  # the prompt the checkpoint answers through ("predict" for a rationale-trained student)
    task_kind: str | None  # the run's [task] kind; None outside a run folder (exact match)
    max_new_tokens: int


def resolve_checkpoint(target: Path) -> Path:
    """A checkpoint folder, or a run folder's newest checkpoints/<iteration>/; else a ConfigError."""
    target = Path(target)
    if (target / SPEC_FILE).is_file():
        return target
    found = sorted((int(p.name), p) for p in (target / "checkpoints").glob("*")
                   if p.name.isdigit() and (p / SPEC_FILE).is_file())
    if found:
        return found[-1][1]
    if not target.exists():
        raise ConfigError(f"{target}: no such run or checkpoint folder")
    raise ConfigError(f"{target}: neither a checkpoint folder (no {SPEC_FILE}) nor a run folder with "
                      f"checkpoints/<iteration>/; train the student first (agentkd run or agentkd train)")


def _run_settings(checkpoint: Path) -> tuple[str | None, int]:
    """[task] kind and the decoding cap of the run a checkpoint belongs to (runs/<name>/checkpoints/<i>/)."""
    run_config = checkpoint.parent.parent / "config.json"
    if checkpoint.parent.name != "checkpoints" or not run_config.is_file():
        return None, DEFAULT_MAX_NEW_TOKENS
    data = json.loads(run_config.read_text(encoding="utf-8"))
    return (data.get("task", {}).get("kind"),
            int(data.get("train", {}).get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)))


def load_for_inference(target: Path) -> LoadedStudent:
    checkpoint = resolve_checkpoint(target)
    try:
        spec = StudentSpec.model_validate_json((checkpoint / SPEC_FILE).read_text(encoding="utf-8"))
    except ValidationError as err:
        raise ConfigError(f"{checkpoint / SPEC_FILE}: not a student spec ({err.error_count()} problem(s))") from None
    student = load_checkpoint(checkpoint, spec=spec)
    import torch

    if torch.cuda.is_available():
        student.model.to("cuda")
    task_kind, max_new_tokens = _run_settings(checkpoint)
    return LoadedStudent(student, checkpoint, checkpoint_task(student.tokenizer), task_kind, max_new_tokens)


def answer(loaded: LoadedStudent, instructions: list[str], *, max_new_tokens: int | None = None,
           temperature: float = 0.0, batch_size: int = 64) -> list[str]:
    return generate_answers(loaded.student, instructions, max_new_tokens=max_new_tokens or loaded.max_new_tokens,
                            temperature=temperature, batch_size=batch_size, task=loaded.task)


def evaluate_file(loaded: LoadedStudent, input_path: Path, *, max_new_tokens: int | None = None,
                  batch_size: int = 64) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Each row with the student's answer (and `correct` where the row has an `answer`), and a summary:
    accuracy over the rows that give an answer, None when none does."""
    rows = read_jsonl(input_path, ("instruction",),
                      fields_hint="eval rows need: instruction; optional: answer (the expected answer)")
    answers = answer(loaded, [r["instruction"] for r in rows], max_new_tokens=max_new_tokens, batch_size=batch_size)
    kind = loaded.task_kind or "exact"
    out, scored, right = [], 0, 0
    for row, text in zip(rows, answers, strict=True):
        result = {**row, "student_answer": text}
        if row.get("answer") is not None:
            result["correct"] = is_correct(str(row["answer"]), text, kind)
            scored += 1
            right += result["correct"]
        out.append(result)
    summary = {"checkpoint": str(loaded.checkpoint), "rows": len(rows), "with_answers": scored,
               "accuracy": right / scored if scored else None, "scoring": kind}
    return out, summary


def eval_command(target: Path, input_path: Path, output: Path | None, *, max_new_tokens: int | None,
                 batch_size: int) -> None:
    """Answers as JSONL to `output` (summary on stdout), or to stdout (summary on stderr)."""
    loaded = load_for_inference(target)
    rows, summary = evaluate_file(loaded, input_path, max_new_tokens=max_new_tokens, batch_size=batch_size)
    if output is not None:
        write_jsonl(output, rows)
        print(json.dumps({**summary, "output": str(output)}))
        return
    for row in rows:
        print(json.dumps(row, ensure_ascii=False))
    print(json.dumps(summary), file=sys.stderr)


def _prompts(stream: TextIO) -> Iterator[str]:
    interactive = stream.isatty()
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = stream.readline()
        if not line:
            return
        if line.strip():
            yield line.rstrip("\n")


def chat_command(target: Path, prompt: str | None, *, max_new_tokens: int | None, temperature: float,
                 stream: TextIO | None = None) -> None:
    """One answer for --prompt, else one answer per line read until end of input (Ctrl-D or Ctrl-C)."""
    loaded = load_for_inference(target)
    stream = stream or sys.stdin
    if prompt is None and stream.isatty():
        print(f"student {loaded.checkpoint}: one instruction per line, Ctrl-D to end", file=sys.stderr)
    try:
        for text in [prompt] if prompt is not None else _prompts(stream):
            print(answer(loaded, [text], max_new_tokens=max_new_tokens, temperature=temperature)[0], flush=True)
    except KeyboardInterrupt:
        print(file=sys.stderr)  # leaving a chat is not an interrupted run: nothing to resume
