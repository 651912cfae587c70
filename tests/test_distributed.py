"""The trainer past one process: `accelerate launch` / torchrun with 2 CPU processes (gloo) on the tiny
student, the loop launching its proxy and train stages, and the batch sharding they rely on."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from agentkd.cli import main
from agentkd.config import ConfigError, TrainSection, load_config
from agentkd.training.launch import launcher_command, run_job
from agentkd.training.optimise import accumulation_steps, make_accelerator, optimise
from agentkd.store.writer import Store
from agentkd.teachers.sim.world import sample_problems

ROOT = Path(__file__).resolve().parents[1]
# 2-process sft (and rationale) match 1 process at the same global batch and seed within this (absolute,
# per step): the same rows reach the same micro-batches; only the order of float sums may differ.
LOSS_TOLERANCE = 1e-4

RUN = """
[run]
name = "{name}"
dir = "{runs}"
[teacher]
provider = "sim"
[budget]
usd = 1
[train]
lr = 3e-3
warmup_steps = 0
batch_size = 4
effective_batch = 8
max_steps = 5
max_len = 96
log_every = 1
cpu_threads = 1
proxy_spec = "students/tiny-proxy.toml"
proxy_max_steps = 2
align_rounds = 1
max_new_tokens = 8
target_shard_rows = 6
"""


def _env() -> dict[str, str]:
    # the launched processes import this tree, one thread each (2 cores, 2 processes)
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _config(folder: Path, name: str) -> Path:
    path = folder / f"{name}.toml"
    path.write_text(RUN.format(name=name, runs=folder / "runs"))
    return path


@pytest.fixture(scope="module")
def taught(tmp_path_factory) -> Path:
    """A run folder with the sim teacher's answers and explanations for 40 instructions."""
    folder = tmp_path_factory.mktemp("taught")
    data = folder / "train.jsonl"
    data.write_text("".join(json.dumps({"instruction": p.text}) + "\n"
                            for p in sample_problems(40, seed=3, steps=(1, 1), digits=(1, 1))))
    config = _config(folder, "base")
    for role in ("answerer", "explainer"):
        assert main(["teach", str(config), "--role", role, "--input", str(data), "--output",
                     str(folder / f"{role}.jsonl"), "--no-progress"]) == 0
    return folder


def _copy_run(taught: Path, folder: Path, name: str) -> Path:
    shutil.copytree(taught / "runs" / "base", folder / "runs" / name)
    return _config(folder, name)


def _launch(config: Path, objective: str, *, launcher: str = "accelerate") -> subprocess.CompletedProcess:
    target = ["-m", "agentkd.cli", "train", str(config), "--objective", objective]
    if launcher == "torchrun":
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *target]
    else:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--main_process_port", "0", *target]
    return subprocess.run(command, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=240)


def _losses(config: Path, iteration: int) -> list[float]:
    store = Store(load_config(config).run_dir / "agentkd.duckdb", read_only=True)
    try:
        return [r[0] for r in store.query("SELECT value FROM metrics WHERE name = 'train/loss' AND iteration = ? "
                                          "ORDER BY step", [iteration])]
    finally:
        store.close_sync()


@pytest.mark.slow
def test_two_processes_train_every_objective_and_sft_matches_one_process(taught, tmp_path):
    one = _copy_run(taught, tmp_path, "one")
    for objective in ("sft", "rationale"):  # in this process: accumulation 2 x 4 rows per step
        assert main(["train", str(one), "--objective", objective]) == 0
    two = _copy_run(taught, tmp_path, "two")
    launchers = {"sft": "accelerate", "rationale": "accelerate", "posterior_kd": "accelerate", "proxy_kd": "torchrun"}
    for iteration, (objective, launcher) in enumerate(launchers.items(), start=1):
        done = _launch(two, objective, launcher=launcher)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert done.stdout.count("trained 40 examples") == 1, done.stdout  # the main process alone reports
        checkpoint = load_config(two).run_dir / "checkpoints" / str(iteration)
        model = AutoModelForCausalLM.from_pretrained(checkpoint)  # transformers alone
        with torch.no_grad():
            assert torch.isfinite(model(input_ids=torch.tensor([[1, 5, 6, 7]])).logits).all()

    for iteration, objective in ((1, "sft"), (2, "rationale")):  # rationale: two forwards per step under DDP
        reference, launched = _losses(one, iteration), _losses(two, iteration)
        assert len(reference) == len(launched) == 5
        gap = max(abs(a - b) for a, b in zip(reference, launched, strict=True))
        print(f"{objective} loss per step, 1 process: {reference}\n2 processes: {launched}\nlargest gap {gap:.2e}")
        assert gap <= LOSS_TOLERANCE

    store = Store(load_config(two).run_dir / "agentkd.duckdb", read_only=True)
    try:  # only the main process wrote: one row per training call, one per proxy stage, one per step
        runs = store.query("SELECT iteration, objective, steps FROM train_runs ORDER BY iteration")
        assert runs == [(1, "sft", 5), (2, "rationale", 5), (3, "posterior_kd", 5), (4, "proxy_kd", 5)]
        assert store.query("SELECT count(*), count(DISTINCT step) FROM metrics WHERE name = 'train/loss'") == [(20, 5)]
        stages = store.query("SELECT iteration, stage FROM proxy_stages ORDER BY iteration, created_at")
        assert [s for i, s in stages if i == 3] == ["before", "warmup", "align1"]
        assert [s for i, s in stages if i == 4] == ["before", "warmup", "align1"]
        kd = store.query("SELECT kd_examples FROM train_runs WHERE iteration >= 3")
        assert all(n > 0 for (n,) in kd)
    finally:
        store.close_sync()
    _check_posterior_shards_against_one_process(load_config(two))


def _check_posterior_shards_against_one_process(run) -> None:
    """Iteration 3's posterior targets, built in shards by 2 processes, against the same targets built
    here in one call from the saved proxy and the same rows."""
    from agentkd.training.kd_targets import MANIFEST, TargetShards
    from agentkd.training.posterior import fit_prior, posterior_targets
    from agentkd.training.proxy import load_proxy
    from agentkd.training.students import load_spec
    from agentkd.training.train import _kd_rows
    from agentkd.training.train_data import encode_pair, format_prompt
    from agentkd.training.run import examples_from_store, teacher_corpus

    folder = run.run_dir / "targets" / "3"
    shards = TargetShards(folder, json.loads((folder / MANIFEST).read_text()))
    assert len(shards.manifest["shards"]) >= 2  # 6 rows a shard, shard c built by process c % 2
    store = Store(run.run_dir / "agentkd.duckdb", read_only=True)
    try:
        examples, corpus = examples_from_store(store, up_to=True), teacher_corpus(store)
    finally:
        store.close_sync()
    cfg = run.train.model_copy(update={"objective": "posterior_kd"})
    q = load_proxy(run.run_dir / "proxy" / "3", spec=load_spec(ROOT / "students" / "tiny-proxy.toml"))
    tok = q.tokenizer
    picked = _kd_rows(examples, cfg)
    assert shards.rows == picked and shards.counts == {"evidence_used": 0, "evidence_unused": 0}
    rows = [encode_pair(tok, format_prompt(examples[i].instruction), examples[i].response, cfg.max_len) for i in picked]
    prior = fit_prior(tok, corpus, cfg, q.model.config.vocab_size)
    alone, _ = posterior_targets(q.model, tok, [examples[i] for i in picked], rows, prior, cfg, torch.device("cpu"))
    for i, expected in zip(picked, alone, strict=True):
        got = shards.get(i)
        assert torch.equal(got.ids, expected.ids)
        torch.testing.assert_close(got.probs, expected.probs, rtol=0, atol=1e-6)
        torch.testing.assert_close(got.tail, expected.tail, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_agentkd_run_with_a_two_process_train_stage_completes_an_iteration(tmp_path):
    config = tmp_path / "loop.toml"
    config.write_text(f"""
[run]
name = "loop"
dir = "{tmp_path / 'runs'}"
[teacher]
provider = "sim"
[budget]
usd = 1
[train]
objective = "posterior_kd"
proxy_spec = "students/tiny-proxy.toml"
max_steps = 4
proxy_max_steps = 2
align_rounds = 1
batch_size = 4
cpu_threads = 1
max_new_tokens = 8
num_processes = 2
[loop]
iterations = 1
seed_count = 24
heldout_count = 8
world_steps = [1, 1]
world_digits = [1, 1]
new_per_iteration = 8
judge_sample = 8
eval_judge_sample = 2
""")
    command = [sys.executable, "-m", "agentkd.cli", "run", str(config), "--no-progress"]
    done = subprocess.run(command, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "2 processes" in done.stderr + done.stdout  # the launched stages say how they ran
    run_dir = tmp_path / "runs" / "loop"
    store = Store(run_dir / "agentkd.duckdb", read_only=True)
    try:
        assert store.query("SELECT iteration, objective, steps FROM train_runs") == [(1, "posterior_kd", 4)]
        assert {s for (s,) in store.query("SELECT stage FROM loop_state WHERE iteration = 1")} >= {
            "answer", "proxy", "train", "judge", "generate", "eval"}
        assert store.query("SELECT count(*) FROM proxy_stages WHERE iteration = 1")[0][0] == 3
        assert store.query("SELECT count(*) FROM metrics WHERE name = 'accuracy' AND iteration = 1")[0][0] == 1
    finally:
        store.close_sync()
    assert (run_dir / "checkpoints" / "1" / "config.json").exists()


def test_a_failed_launch_is_a_config_error_naming_its_exit_code(tmp_path):
    cfg = TrainSection(num_processes=2, launcher_args=["--no_such_flag"])
    with pytest.raises(ConfigError, match=r"train.num_processes: the launched train stage exited [1-9]"):
        run_job(cfg, tmp_path, "train", echo=lambda line: None)


def test_the_launcher_command_adds_multi_gpu_only_when_the_arguments_choose_no_distributed_type(tmp_path):
    plain = launcher_command(TrainSection(num_processes=2), tmp_path)
    assert plain[1:3] == ["-m", "accelerate.commands.launch"] and "--multi_gpu" in plain
    assert plain[-6:] == ["-m", "agentkd.cli", "train", str(tmp_path / "config.json"), "--job", str(tmp_path)]
    fsdp = launcher_command(TrainSection(num_processes=2, launcher_args=["--config_file=fsdp.yaml"]), tmp_path)
    assert "--multi_gpu" not in fsdp and "--config_file=fsdp.yaml" in fsdp
    torchrun = launcher_command(TrainSection(num_processes=3, launcher="torchrun"), tmp_path)
    assert torchrun[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "3"]


def test_a_training_plan_comes_back_from_its_job_file_as_it_was_written(tmp_path):
    from agentkd.training.launch import TrainPlan
    from agentkd.training.train_data import TrainingExample

    plan = TrainPlan(stage="train", iteration=2, objective="posterior_kd", teacher_texts=["4 + 3 = 7."],
                     student_checkpoint="runs/x/checkpoints/1", progress=False, examples=[
                         TrainingExample("q1", " 7.", label="7", rationale="because",
                                         teacher_top_logprobs=[[(" 7", -1.2), (" 8", -0.4)], [(".", -0.01)]]),
                         TrainingExample("q2", "8")])
    plan.write(tmp_path)
    assert TrainPlan.read(tmp_path) == plan  # logprobs come back as (token, logprob) tuples
    with pytest.raises(ConfigError, match="no training plan"):
        TrainPlan.read(tmp_path / "elsewhere")


def test_every_step_gets_a_full_micro_batch_and_every_row_is_seen():
    cfg = TrainSection(batch_size=4, warmup_steps=0, lr=1e-3)
    model = torch.nn.Linear(2, 1)
    seen: list[list[int]] = []

    def step(wrapped, batch):
        seen.append(list(batch))
        return wrapped(torch.ones(len(batch), 2)).sum() * 0.0, len(batch)

    stats = optimise(model, list(range(10)), step, cfg, make_accelerator(cfg), pad_id=0, epochs=1.0,
                     max_seconds=None, seed=0, name="t", log_metric=None, progress=False)
    assert stats["steps"] == 3 and [len(b) for b in seen] == [4, 4, 4]  # 10 rows: no short last batch
    assert set(sum(seen, [])) == set(range(10))


def test_gradient_accumulation_reaches_the_effective_batch():
    assert accumulation_steps(TrainSection(batch_size=4, effective_batch=8), processes=1) == 2
    assert accumulation_steps(TrainSection(batch_size=4, effective_batch=8), processes=2) == 1
    assert accumulation_steps(TrainSection(batch_size=4, effective_batch=128), processes=3) == 11  # rounded up
    assert accumulation_steps(TrainSection(batch_size=4), processes=2) == 1


@pytest.mark.parametrize("lora", [False, True])
def test_gradient_checkpointing_trains_alike_and_is_on_while_training(lora):
    from agentkd.config import LoraSection
    from agentkd.training.optimise import checkpointing_on, sft_step
    from tests.test_train import examples, tiny

    exs = examples(16)
    losses: dict[bool, list[float]] = {}
    for checkpointing in (False, True):
        student = tiny(exs, lora=LoraSection(enabled=True, r=4) if lora else None)
        cfg = TrainSection(batch_size=4, warmup_steps=0, lr=3e-3, gradient_checkpointing=checkpointing, log_every=1)
        rows = [r[0] for r in _sft_rows(student, exs)]
        flags: list[bool] = []

        def step(model, batch, flags=flags):
            flags.append(checkpointing_on(model))
            return sft_step(model, batch)

        losses[checkpointing] = []
        optimise(student.model, rows, step, cfg, make_accelerator(cfg), pad_id=0, epochs=1.0, max_seconds=None,
                 seed=0, name="t", progress=False,
                 log_metric=lambda n, v, s, out=losses[checkpointing]: out.append(v) if n == "t/loss" else None)
        assert set(flags) == {checkpointing}
        assert not checkpointing_on(student.model)  # off again afterwards
    torch.testing.assert_close(losses[True], losses[False], rtol=0, atol=1e-5)


def _sft_rows(student, exs):
    from agentkd.training.train_data import encode_pair, format_prompt

    return [(encode_pair(student.tokenizer, format_prompt(e.instruction), e.response, 96),) for e in exs]


@pytest.mark.slow
def test_the_gpu_benchmark_skips_without_cuda_and_runs_every_case_on_a_tiny_config():
    script = [sys.executable, str(ROOT / "benchmarks" / "train_gpu.py")]
    if not torch.cuda.is_available():
        done = subprocess.run(script, env=_env(), capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and json.loads(done.stdout.splitlines()[-1]) == {"skipped": "no CUDA device"}
    smoke = subprocess.run([*script, "--smoke", "--batch", "2", "--seq", "32", "--steps", "2", "--warmup", "1"],
                           env=_env(), capture_output=True, text=True, timeout=300)
    assert smoke.returncode == 0, smoke.stderr[-3000:]
    result = json.loads(smoke.stdout.splitlines()[-1])
    for case in ("sft/full", "sft/lora", "posterior_kd/full", "posterior_kd/lora"):
        assert result[case]["steps"] == 2 and result[case]["tokens_per_s"] > 0
    assert result["sft/lora"]["trainable_parameters"] < result["sft/full"]["trainable_parameters"]
    assert result["posterior_targets"]["positions"] == 2 * 16


BF16_SCRIPT = """
import json, sys, torch
sys.path.insert(0, {root!r})
from agentkd.config import TrainSection
from agentkd.training.train import train
from tests.test_train import FAST, examples, tiny, trained_proxy_for

exs = examples(24)
cfg = TrainSection(objective="posterior_kd", epochs=1, proxy_spec="students/tiny-proxy.toml", precision={precision!r},
                   **{{**FAST, "align_rounds": 0, "proxy_max_steps": 2}})  # a quick proxy: warm-up only
student = tiny(exs)
proxy = trained_proxy_for(student, exs, cfg)
autocast = {{"student": [], "q": []}}
for name, model in (("student", student.model), ("q", proxy.model)):
    model.get_decoder().register_forward_hook(
        lambda m, i, o, name=name: autocast[name].append(torch.is_autocast_enabled("cpu")))
losses = []
train(student, exs, cfg, out_dir={out!r}, proxy=proxy, progress=False,
      log_metric=lambda n, v, s: losses.append(v) if n == "train/loss" else None)
print(json.dumps({{"losses": losses, "autocast": {{k: sorted(set(v)) for k, v in autocast.items()}}}}))
"""


def _precision_run(tmp_path: Path, precision: str) -> dict:
    script = BF16_SCRIPT.format(root=str(ROOT), precision=precision, out=str(tmp_path / precision))
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.slow
def test_bf16_runs_the_student_and_the_kd_targets_q_alike_in_bf16_autocast(tmp_path):
    # on CPU as a stand-in for CUDA ("auto" picks bf16 there): one process per precision (accelerate's
    # state is per process)
    bf16, fp32 = _precision_run(tmp_path, "bf16"), _precision_run(tmp_path, "fp32")
    assert bf16["autocast"] == {"student": [True], "q": [True]}  # training forwards and target building
    assert fp32["autocast"] == {"student": [False], "q": [False]}
    assert len(bf16["losses"]) == len(fp32["losses"]) > 0 and bf16["losses"] != fp32["losses"]
    torch.testing.assert_close(bf16["losses"], fp32["losses"], rtol=0.05, atol=0)  # bf16 rounding, same training


def test_accelerates_own_fsdp_is_refused_rather_than_quietly_run_as_ddp(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch --use_fsdp` sets
    with pytest.raises(ConfigError, match="set train.fsdp = true"):
        make_accelerator(TrainSection())


@pytest.mark.slow
def test_two_processes_with_train_fsdp_shard_the_student_match_one_process_and_save_a_whole_checkpoint(taught, tmp_path):
    one = _copy_run(taught, tmp_path, "one")
    assert main(["train", str(one), "--objective", "sft"]) == 0  # in this process: accumulation 2 x 4 rows
    sharded = _copy_run(taught, tmp_path, "sharded")
    sharded.write_text(sharded.read_text() + "fsdp = true\n")
    for iteration, (objective, launcher) in enumerate((("sft", "accelerate"), ("proxy_kd", "torchrun")), start=1):
        done = _launch(sharded, objective, launcher=launcher)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert done.stdout.count("trained 40 examples") == 1, done.stdout
        assert done.stderr.count("train: FSDP2, 4 layers and the root sharded over 2 processes") == 1, done.stderr
        checkpoint = load_config(sharded).run_dir / "checkpoints" / str(iteration)
        model = AutoModelForCausalLM.from_pretrained(checkpoint)  # transformers alone: whole, unsharded weights
        with torch.no_grad():
            assert torch.isfinite(model(input_ids=torch.tensor([[1, 5, 6, 7]])).logits).all()
        if iteration == 1:
            trained = model
    reference, launched = _losses(one, 1), _losses(sharded, 1)
    assert len(reference) == len(launched) == 5
    gap = max(abs(a - b) for a, b in zip(reference, launched, strict=True))
    print(f"sft loss per step, 1 process: {reference}\nFSDP, 2 processes: {launched}\nlargest gap {gap:.2e}")
    assert gap <= LOSS_TOLERANCE
    # the gathered checkpoint is the trained model: the same weights as the 1-process run's, to float noise
    alone = AutoModelForCausalLM.from_pretrained(load_config(one).run_dir / "checkpoints" / "1")
    for (name, a), b in zip(alone.state_dict().items(), trained.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-4, msg=name)
    store = Store(load_config(sharded).run_dir / "agentkd.duckdb", read_only=True)
    try:
        assert store.query("SELECT iteration, objective, steps FROM train_runs ORDER BY iteration") == [
            (1, "sft", 5), (2, "proxy_kd", 5)]
        assert store.query("SELECT kd_examples > 0 FROM train_runs WHERE iteration = 2") == [(True,)]
    finally:
        store.close_sync()


LORA_SCRIPT = """
import json, sys, torch
sys.path.insert(0, {root!r})
import torch.distributed as dist
from agentkd.config import LoraSection, TrainSection
from agentkd.training.train import train
from tests.test_train import examples, tiny

exs = examples(16)
student = tiny(exs, lora=LoraSection(enabled=True, r=4))
# 2 processes accumulate 2 micro-batches (the gradient reduce-scatter skipped on the first), 1 process 4;
# activation checkpointing inside the sharded layers
cfg = TrainSection(batch_size=4, effective_batch=16, warmup_steps=0, lr=3e-3, log_every=1, max_len=96, max_steps=3,
                   fsdp=True, gradient_checkpointing=True)
losses = []
train(student, exs, cfg, out_dir=sys.argv[1], progress=False,
      log_metric=lambda n, v, s: losses.append(v) if n == "train/loss" else None)
if not dist.is_initialized() or dist.get_rank() == 0:
    print(json.dumps(losses))
"""


@pytest.mark.slow
def test_lora_and_checkpointing_under_fsdp_train_the_adapter_on_a_sharded_frozen_base_like_one_process(tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file

    script = tmp_path / "lora.py"
    script.write_text(LORA_SCRIPT.format(root=str(ROOT)))
    runs = {"one": [sys.executable, str(script)],  # train.fsdp with one process: no effect
            "two": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]}
    losses = {}
    for name, command in runs.items():
        done = subprocess.run([*command, str(tmp_path / name)], cwd=ROOT, env=_env(), capture_output=True, text=True,
                              timeout=240)
        assert done.returncode == 0, done.stderr[-3000:]
        assert ("FSDP2, 4 layers and the root sharded over 2 processes" in done.stderr) == (name == "two")
        losses[name] = json.loads(done.stdout.splitlines()[-1])
    assert len(losses["one"]) == 3 and losses["one"][-1] < losses["one"][0]
    torch.testing.assert_close(losses["two"], losses["one"], rtol=0, atol=LOSS_TOLERANCE)
    for part in ("adapter_model.safetensors", "base/model.safetensors"):  # the adapter trained, the base whole
        alone, sharded = load_file(tmp_path / "one" / part), load_file(tmp_path / "two" / part)
        assert alone.keys() == sharded.keys()
        for key, value in alone.items():
            torch.testing.assert_close(sharded[key], value, rtol=0, atol=1e-5, msg=key)
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "two" / "base")
    model = PeftModel.from_pretrained(base, tmp_path / "two")  # transformers + peft alone
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[1, 5, 6, 7]])).logits).all()
