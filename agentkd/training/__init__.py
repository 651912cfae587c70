"""The student's training: students and checkpoints (students.py), the data contract (train_data.py),
the objectives as tensor functions (objectives.py), the one optimisation loop (optimise.py), posterior
and proxy KD targets (posterior.py, ngram.py, evidence.py, kd_targets.py), the run's proxy (proxy.py,
proxy_check.py), decoding (decode.py), several processes (launch.py; sharding: fsdp.py) and the way
from the run database to a checkpoint (run.py). It reads teacher answers from the store and makes no
teacher call.

Must not import: agentkd.gateway, agentkd.teachers, agentkd.roles, agentkd.batches, agentkd.session,
agentkd.workpool, agentkd.run_status, agentkd.lion, agentkd.cli, agentkd.teach, agentkd.estimate,
agentkd.inference, agentkd.watch.
"""
