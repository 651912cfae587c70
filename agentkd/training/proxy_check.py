"""Is the run's proxy good enough to distil from? Apart from proxy.py so the report reads it without torch."""

from __future__ import annotations


def weaker_than_student(proxy_logp: float | None, student_logp: float | None) -> str | None:
    """A warning when the proxy predicts held-out teacher answers worse than the student does (mean log p
    per token). Its q then pulls the student toward a weaker model: in the quality lab (benchmarks/quality.md)
    a proxy trained from scratch on the same answers stayed below the student and posterior/proxy KD lost
    to plain sft. None when the proxy is ahead or a figure is missing."""
    if proxy_logp is None or student_logp is None or proxy_logp >= student_logp:
        return None
    return (f"the proxy predicts held-out teacher answers worse than the student (log p per token "
            f"{proxy_logp:.3f} < {student_logp:.3f}): KD toward it can make the student worse than sft. Give "
            "it more training (train.proxy_epochs, train.proxy_max_steps) or a stronger train.proxy_spec (a "
            "pretrained model on the student's tokenizer)")
