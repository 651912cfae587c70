"""The Lion loop (arXiv 2305.12870): imitation -> discrimination -> generation, iterated (loop.py); what a
loop will ask of the teacher (plan.py); its pools over the run database (pools.py), the near-duplicate
filter (dedup.py), which seeds the generator gets (selection.py), the rows role results are stored as
(role_rows.py), held-out accuracy (evaluate.py) and the run's report (report.py). It drives the teacher
through agentkd.session / agentkd.workpool and the student through agentkd.training.

Must not import: agentkd.cli, agentkd.teach, agentkd.estimate, agentkd.inference, agentkd.watch.
"""
