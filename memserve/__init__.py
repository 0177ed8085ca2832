"""memserve: lifelong knowledge editing (WISE, MEMOIR) for LLMs served with vLLM."""

__version__ = "0.1.0"
