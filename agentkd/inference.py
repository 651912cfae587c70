"""`agentkd eval` and `agentkd chat`: use a trained student without reading the source.

TARGET is a run folder (its newest checkpoints/<iteration>/) or a checkpoint folder. The prompt
format comes from the checkpoint's chat template (train_data.chat_template), so what these commands
send is what transformers or vLLM send with the same folder. When the checkpoint lies in a run folder,
its [task] decides the rows and the scoring: arithmetic rows are `instruction` (+ `answer`, right when
the final number matches); label-task rows are the item's fields (task.input_fields, rendered as the
loop renders them) + `label`, right when the label the answer gives is the gold one. Outside a run
folder rows are `instruction` (+ `answer`, an exact, case-blind match).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from pydantic import ValidationError

from agentkd.config import ConfigError, TaskSection, TrainSection
from agentkd.datasets import read_jsonl, write_jsonl
from agentkd.training.decode import generate_answers
from agentkd.lion.evaluate import is_correct
from agentkd.training.students import SPEC_FILE, Student, StudentSpec, load_checkpoint
from agentkd.training.train_data import Task, checkpoint_task

DEFAULT_MAX_NEW_TOKENS = TrainSection().max_new_tokens  # the loop's decoding cap, unless the run set another


@dataclass
class LoadedStudent:
    student: Student
    checkpoint: Path
    task: Task  # the prompt the checkpoint answers through ("predict" for a rationale-trained student)
    task_config: TaskSection | None  # the run's [task]; None outside a run folder (exact match)
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


def _run_settings(checkpoint: Path) -> tuple[TaskSection | None, int]:
    """[task] and the decoding cap of the run a checkpoint belongs to (runs/<name>/checkpoints/<i>/)."""
    run_config = checkpoint.parent.parent / "config.json"
    if checkpoint.parent.name != "checkpoints" or not run_config.is_file():
        return None, DEFAULT_MAX_NEW_TOKENS
    data = json.loads(run_config.read_text(encoding="utf-8"))
    try:
        task = TaskSection.model_validate(data.get("task", {}))
    except ValidationError as err:
        raise ConfigError(f"{run_config}: task: not a [task] section ({err.error_count()} problem(s))") from None
    return task, int(data.get("train", {}).get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS))


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
    task_config, max_new_tokens = _run_settings(checkpoint)
    return LoadedStudent(student, checkpoint, checkpoint_task(student.tokenizer), task_config, max_new_tokens)


def answer(loaded: LoadedStudent, instructions: list[str], *, max_new_tokens: int | None = None,
           temperature: float = 0.0, batch_size: int = 64) -> list[str]:
    return generate_answers(loaded.student, instructions, max_new_tokens=max_new_tokens or loaded.max_new_tokens,
                            temperature=temperature, batch_size=batch_size, task=loaded.task)


def evaluate_file(loaded: LoadedStudent, input_path: Path, *, max_new_tokens: int | None = None,
                  batch_size: int = 64) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Each row with the student's answer (and `correct` where the row gives the expected answer), and a
    summary: accuracy over the rows that give one, None when none does."""
    task = loaded.task_config
    if task is not None and task.has_labels:
        return _evaluate_labels(loaded, task, input_path, max_new_tokens=max_new_tokens, batch_size=batch_size)
    rows = read_jsonl(input_path, ("instruction",),
                      fields_hint="eval rows need: instruction; optional: answer (the expected answer)")
    answers = answer(loaded, [r["instruction"] for r in rows], max_new_tokens=max_new_tokens, batch_size=batch_size)
    kind = task.kind if task is not None else "exact"
    out = []
    for row, text in zip(rows, answers, strict=True):
        result = {**row, "student_answer": text}
        if row.get("answer") is not None:
            result["correct"] = is_correct(str(row["answer"]), text, kind)
        out.append(result)
    return out, _summary(loaded, out, kind)


def _evaluate_labels(loaded: LoadedStudent, config: TaskSection, input_path: Path, *, max_new_tokens: int | None,
                     batch_size: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """A label task's rows: the item's fields rendered as the loop renders them; `label` the gold one."""
    from agentkd.lion.evaluate import student_label
    from agentkd.roles.items import fields_of_row, item_schema, render
    from agentkd.lion.pools import Item
    from agentkd.roles.explainer import task_definition

    schema, task = item_schema(config), task_definition(config)
    items = []
    for number, row in enumerate(read_jsonl(input_path, ()), start=1):
        where = f"{input_path}:{number}"
        fields = fields_of_row(row, schema, where)
        gold = None
        if row.get("label") is not None:
            options = fields.get("options")
            gold, why = (task.with_options(options) if isinstance(options, list) else task).canonical(str(row["label"]))
            if gold is None:
                raise ConfigError(f"{where}: field 'label': {why} (labels: {task.labels_text})")
        text = render(fields, schema)
        items.append((row, Item(text, text, 0, "heldout", gold, fields)))
    answers = answer(loaded, [item.text for _, item in items], max_new_tokens=max_new_tokens, batch_size=batch_size)
    out = []
    for (row, item), text in zip(items, answers, strict=True):
        label = student_label(text, item, task)
        result = {**row, "student_answer": text, "student_label": label}
        if item.answer is not None:
            result["correct"] = label == item.answer
        out.append(result)
    return out, _summary(loaded, out, f"label ({config.kind})")


def _summary(loaded: LoadedStudent, rows: list[dict[str, Any]], scoring: str) -> dict[str, Any]:
    scored = [r["correct"] for r in rows if "correct" in r]
    return {"checkpoint": str(loaded.checkpoint), "rows": len(rows), "with_answers": len(scored),
            "accuracy": sum(scored) / len(scored) if scored else None, "scoring": scoring}


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
