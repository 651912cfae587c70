"""The distillation quality lab's parts (benchmarks/distill_quality.py runs them): plan (sizes, world,
tokenizer), teacher (the LM teacher and its HTTP responder), teaching (through agentkd's gateway),
jobs (trainings in worker processes), measure (held-out accuracy and exact KL), lion (Lion vs random
expansion), table (JSON, markdown, plot)."""
