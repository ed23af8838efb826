"""Fidelity tools: teacher-forced perplexity through the engine's model, merge/export, comparisons."""
