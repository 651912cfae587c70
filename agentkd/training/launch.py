"""Training in several processes, launched by the loop: `accelerate launch` (or torchrun) of
`agentkd train <job>/config.json --job <job>` on the run directory.

Teacher calls and the run's DuckDB file stay in the one orchestrating process (DuckDB has one writer,
and the loop holds it). So the loop writes a job folder the launched processes read — what to train on
and from which weights — and the launched main process writes back the rows it would have stored:

    runs/<name>/launch/<iteration>-<stage>/
        config.json   the run's config (load_config reads it)
        plan.json     TrainPlan: stage, iteration, objective, examples, the teacher corpus, the student
        student/      the loop's student when it has no checkpoint yet (a fresh one)
        rows.jsonl    {"table": ..., "rows": [...]} per record, appended by the launched main process
        result.json   the TrainResult of a train stage

The loop checks the exit code, then stores rows.jsonl; the stage is marked done only after that, so
a failed or killed launch is re-run on resume and pays nothing twice.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from agentkd.config import ConfigError, RunConfig, TrainSection, dump_config
from agentkd.training.train import TrainResult
from agentkd.training.train_data import TrainingExample

Stage = Literal["proxy", "train"]
PLAN, ROWS, RESULT = "plan.json", "rows.jsonl", "result.json"

# launcher flags that choose the distributed type themselves: then --multi_gpu is not added
_OWN_TYPE = ("--config_file", "--multi_gpu", "--use_fsdp", "--use_deepspeed", "--use_megatron_lm", "--cpu", "--tpu")


@dataclass
class TrainPlan:
    """Everything a training call reads from the run's store, as plain data (a file, or a broadcast)."""

    stage: Stage
    iteration: int
    objective: str
    examples: list[TrainingExample]
    teacher_texts: list[str]
    student_checkpoint: str | None = None  # None: a fresh student from tokenizer_texts
    tokenizer_texts: list[str] = field(default_factory=list)
    progress: bool = True

    def write(self, folder: Path) -> None:
        data = asdict(self)
        (Path(folder) / PLAN).write_text(json.dumps(data) + "\n", encoding="utf-8")

    @classmethod
    def read(cls, folder: Path) -> TrainPlan:
        path = Path(folder) / PLAN
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: no training plan (--job expects a folder written by `agentkd run`)") from None
        data["examples"] = [_example(e) for e in data["examples"]]
        return cls(**data)


def _example(data: Mapping[str, Any]) -> TrainingExample:
    top = data.get("teacher_top_logprobs")
    return TrainingExample(**{**data, "teacher_top_logprobs": None if top is None else
                              [[(str(t), float(lp)) for t, lp in position] for position in top]})


class JobRows:
    """The launched main process's store stand-in: rows appended to rows.jsonl for the loop to store."""

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / ROWS

    def append_now(self, table: str, rows: Iterable[Mapping[str, Any]]) -> int:
        rows = [dict(r) for r in rows]
        with self.path.open("a", encoding="utf-8") as out:
            out.write(json.dumps({"table": table, "rows": rows}, default=str) + "\n")
        return len(rows)


class Discard:
    """Every process but the main one: nothing is recorded."""

    def append_now(self, table: str, rows: Iterable[Mapping[str, Any]]) -> int:
        return 0


def write_result(folder: Path, result: TrainResult) -> None:
    data = {**asdict(result), "checkpoint": str(result.checkpoint)}
    (Path(folder) / RESULT).write_text(json.dumps(data) + "\n", encoding="utf-8")


def read_result(folder: Path) -> TrainResult:
    data = json.loads((Path(folder) / RESULT).read_text(encoding="utf-8"))
    return TrainResult(**{**data, "checkpoint": Path(data["checkpoint"])})


def job_dir(config: RunConfig, iteration: int, stage: Stage) -> Path:
    return config.run_dir / "launch" / f"{iteration}-{stage}"


def launcher_command(cfg: TrainSection, job: Path) -> list[str]:
    """The launcher's argv: our defaults first, then train.launcher_args (later flags win)."""
    extra = list(cfg.launcher_args)
    target = ["-m", "agentkd.cli", "train", str(job / "config.json"), "--job", str(job)]
    if cfg.launcher == "torchrun":
        # --standalone: a rendezvous on a free local port, so runs side by side do not collide
        return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node", str(cfg.num_processes), *extra, *target]
    own_type = any(a.split("=")[0] in _OWN_TYPE for a in extra)
    return [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(cfg.num_processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", "0",  # 0: a free port
            *([] if own_type else ["--multi_gpu"]), *extra, *target]


def prepare_job(config: RunConfig, stage: Stage, iteration: int, examples: Sequence[TrainingExample],
                teacher_texts: Sequence[str], student: Any, student_checkpoint: Path | None, *,
                objective: str | None = None, progress: bool = True) -> Path:
    """A fresh job folder for one launched stage. A student without a checkpoint is saved into it, so
    the launched processes continue from exactly the loop's weights and tokenizer."""
    from agentkd.training.students import save_checkpoint

    job = job_dir(config, iteration, stage)
    shutil.rmtree(job, ignore_errors=True)
    job.mkdir(parents=True)
    if student_checkpoint is None:
        save_checkpoint(student, job / "student")
        student_checkpoint = job / "student"
    dump_config(config, job / "config.json")
    TrainPlan(stage=stage, iteration=iteration, objective=objective or config.train.objective,
              examples=list(examples), teacher_texts=list(teacher_texts),
              student_checkpoint=str(student_checkpoint), progress=progress).write(job)
    return job


def run_job(cfg: TrainSection, job: Path, stage: Stage, *, echo=print) -> None:
    """Run the launcher on `job`; its output goes straight to this process's (progress bars included).
    A non-zero exit is a ConfigError naming the command: nothing stored is lost, the stage re-runs."""
    command = launcher_command(cfg, job)
    echo(f"{stage}: {cfg.num_processes} processes: {' '.join(command)}")
    code = subprocess.run(command, check=False).returncode
    if code != 0:
        raise ConfigError(f"train.num_processes: the launched {stage} stage exited {code} (its output is above; "
                          f"command: {' '.join(command)}). Nothing stored was lost: re-run to resume")


def job_rows(job: Path) -> list[tuple[str, list[dict[str, Any]]]]:
    """The rows the launched main process recorded, in order."""
    path = Path(job) / ROWS
    if not path.exists():
        return []
    return [(r["table"], r["rows"]) for r in map(json.loads, path.read_text(encoding="utf-8").splitlines()) if r]
