"""KD targets on disk: shards streamed by the trainer give the same loss as targets held in memory, and a
resumed run reuses them only when their inputs did not change."""

from __future__ import annotations

import torch

from agentkd.config import TrainSection
from agentkd.training.kd_targets import KDRows, ShardPart, build_target_shards, open_if_current
from agentkd.training.optimise import make_accelerator
from agentkd.training.posterior import fit_prior, posterior_targets
from agentkd.training.proxy import proxy_target_logps
from agentkd.training.train import _posterior_step, _proxy_kd_step, train
from agentkd.training.train_data import encode_pair, format_prompt
from tests.test_train import FAST, examples, proxy_for, tiny, trained_proxy_for


def _setup(n: int = 12):
    exs = examples(n)
    student = tiny(exs)
    cfg = TrainSection(top_k=5, prior_top_k=3)
    rows = [encode_pair(student.tokenizer, format_prompt(e.instruction), e.response, 96) for e in exs]
    return exs, student, cfg, rows


def test_streamed_posterior_targets_give_the_loss_of_in_memory_targets(tmp_path):
    exs, student, cfg, rows = _setup()
    q = proxy_for(student).model
    prior = fit_prior(student.tokenizer, [e.response for e in exs], cfg, q.config.vocab_size)
    picked = [0, 2, 3, 5, 7, 8, 11]  # some rows without targets (outside the kd role)
    in_memory, _ = posterior_targets(q, student.tokenizer, [exs[i] for i in picked], [rows[i] for i in picked],
                                     prior, cfg, torch.device("cpu"))
    by_index = dict(zip(picked, in_memory, strict=True))
    shards, reused = build_target_shards(tmp_path, "k", picked, lambda idx: ShardPart([by_index[i] for i in idx]),
                                         make_accelerator(cfg), shard_rows=3)
    assert not reused and len(list(tmp_path.glob("shard-*"))) == 3  # 7 rows, 3 a shard
    memory_rows, disk_rows = KDRows(rows, by_index.get), KDRows(rows, shards.get)
    assert disk_rows[1][1] is None and memory_rows[1][1] is None
    step = _posterior_step(kd_lambda=1.0)
    model = student.model
    for batch in ([0, 1, 2, 3], [5, 7, 11, 4], list(range(12))):
        with torch.no_grad():
            a, n_a = step(model, [memory_rows[i] for i in batch])
            b, n_b = step(model, [disk_rows[i] for i in batch])
        assert torch.equal(a, b) and n_a == n_b


def test_streamed_proxy_targets_and_weights_give_the_loss_of_in_memory_ones(tmp_path):
    exs, student, cfg, rows = _setup()
    proxy = proxy_for(student).model
    picked = list(range(0, 12, 2))
    targets, logp = proxy_target_logps(proxy, [rows[i] for i in picked], cfg, torch.device("cpu"), pad_id=0)
    by_index = dict(zip(picked, targets, strict=True))
    shards, _ = build_target_shards(tmp_path, "k", picked, lambda idx: ShardPart(
        [by_index[i] for i in idx], row_values=[float(logp[picked.index(i)]) for i in idx]),
        make_accelerator(cfg), shard_rows=4)
    assert shards.row_values == logp.tolist()  # in picked order across shards
    weights = [0.5 + i / 24 for i in range(12)]
    step = _proxy_kd_step(kd_lambda=1.0)
    with torch.no_grad():
        a, _ = step(student.model, list(KDRows(rows, by_index.get, weights)))
        b, _ = step(student.model, list(KDRows(rows, shards.get, weights)))
    assert torch.equal(a, b)


def test_targets_are_reused_only_when_their_inputs_match(tmp_path):
    exs, student, cfg, rows = _setup(6)
    calls: list[list[int]] = []

    def build(idx):
        calls.append(idx)
        return ShardPart([proxy_target_logps(proxy_for(student).model, [rows[i] for i in idx], cfg,
                                             torch.device("cpu"), pad_id=0)[0][j] for j in range(len(idx))])

    accelerator = make_accelerator(cfg)
    build_target_shards(tmp_path, "inputs-1", [0, 1, 2], build, accelerator, shard_rows=2)
    _, reused = build_target_shards(tmp_path, "inputs-1", [0, 1, 2], build, accelerator, shard_rows=2)
    assert reused and calls == [[0, 1], [2]]
    _, reused = build_target_shards(tmp_path, "inputs-2", [0, 1, 2], build, accelerator, shard_rows=2)
    assert not reused and calls[2:] == [[0, 1], [2]]
    (tmp_path / "manifest.json").unlink()  # an interrupted build: no manifest, so nothing is trusted
    assert open_if_current(tmp_path, "inputs-2") is None


def test_training_with_targets_on_disk_matches_training_in_memory_and_reuses_them(tmp_path):
    exs = examples(24)
    cfg = TrainSection(objective="posterior_kd", epochs=2, proxy_spec="students/tiny-proxy.toml", target_shard_rows=5,
                       **FAST)
    losses: dict[str, list[float]] = {"memory": [], "disk": [], "again": []}
    for name, targets_dir in (("memory", None), ("disk", tmp_path / "t"), ("again", tmp_path / "t")):
        student = tiny(exs)
        proxy = trained_proxy_for(student, exs, cfg)
        train(student, exs, cfg, out_dir=tmp_path / name, proxy=proxy, progress=False, targets_dir=targets_dir,
              log_metric=lambda n, v, s, name=name: losses[name].append(v) if n == "train/loss" else None)
        if name == "disk":
            built = (tmp_path / "t" / "manifest.json").stat().st_mtime_ns
    assert len(list((tmp_path / "t").glob("shard-*"))) >= 2
    # shards are built 5 rows at a time (q's batches padded differently): equal up to float rounding
    torch.testing.assert_close(losses["disk"], losses["memory"], rtol=0, atol=1e-5)
    assert (tmp_path / "t" / "manifest.json").stat().st_mtime_ns == built  # the same inputs: reused
    assert losses["again"] == losses["disk"]
