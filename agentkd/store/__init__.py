"""The run store: one DuckDB file per run, its schema (schema.py), its single connection (db.py), the one
writer every row goes through and the queries the loop and trainer use (writer.py), the logprob record
of a call (logprob_record.py) and the training-data export (export.py). Rows are data: the store knows
no teacher, no role and no model.

Must not import: agentkd.teachers, agentkd.gateway, agentkd.roles, agentkd.batches, agentkd.session,
agentkd.workpool, agentkd.run_status, agentkd.lion, agentkd.training, agentkd.cli, agentkd.teach,
agentkd.estimate, agentkd.inference, agentkd.watch.
"""
