"""The logprob record on a call row, and what training is told about how the evidence fits its student."""

from __future__ import annotations

import asyncio
import json

from agentkd.config import SimSection, config_from_dict
from agentkd.store.logprob_record import evidence_fit
from agentkd.store.writer import Store
from agentkd.teach import teach
from agentkd.teachers.sim import sim_in_thread
from agentkd.teachers.sim.world import sample_problems


def test_calls_record_alternatives_kind_temperature_and_tokenizer(tmp_path):
    rows = tmp_path / "in.jsonl"
    rows.write_text("".join(json.dumps({"instruction": p.text}) + "\n" for p in sample_problems(4, seed=8)))
    with sim_in_thread(SimSection()) as sim:
        config = config_from_dict({
            "run": {"name": "l", "dir": str(tmp_path / "runs")},
            "teacher": {"provider": "sim", "base_url": sim.base_url, "top_logprobs": 3, "tokenizer_hash": "tok-a"},
            "roles": {"answerer": {"temperature": 0.4}},
        })
        asyncio.run(teach(config, "answerer", rows, tmp_path / "out.jsonl", show_progress=False))
    store = Store(config.run_dir / "agentkd.duckdb", read_only=True)
    try:
        record = store.query("SELECT DISTINCT logprobs_top, logprobs_kind, logprobs_temperature, tokenizer_hash "
                             "FROM calls WHERE status = 'ok'")
        assert record == [(3, "raw", 0.4, "tok-a")]
        fits = evidence_fit(store, "tok-a")
        misfit = evidence_fit(store, "tok-b")
    finally:
        store.close_sync()
    assert fits.startswith("teacher logprobs: 4 calls on the student's tokenizer") and "another" not in fits
    assert "0 calls on the student's tokenizer, 4 on another tokenizer (they do not fit this student" in misfit
