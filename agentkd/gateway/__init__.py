"""The teacher gateway: the one path every teacher call takes (core.py, DESIGN.md "The gateway"), with
what it needs to keep its promises — the hard budget (budget.py), the durable spend cover that survives
a crash (ledger.py), client-side rate limits (limiter.py), the retry policy (retry.py) and the token
estimates reservations are made from (tokens.py). It speaks to teachers through agentkd.teachers and
records every call through agentkd.store; it knows nothing of what a call is for.

Must not import: agentkd.roles, agentkd.batches, agentkd.session, agentkd.workpool, agentkd.run_status,
agentkd.lion, agentkd.training, agentkd.cli, agentkd.teach, agentkd.estimate, agentkd.inference,
agentkd.watch.
"""
