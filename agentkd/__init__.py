"""agentkd: distil a closed teacher LLM into a small open student."""
__version__ = "0.1.0"
