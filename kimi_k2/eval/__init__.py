"""Evaluation harness: held-out chat and tool-use benchmarks run against any OpenAI-compatible endpoint."""
