"""Evaluation: held-out chat and tool-use benchmarks run against any OpenAI-compatible endpoint, over HTTP only.

The benchmark environment lives here: the executable tools (tools.py, world.py, schema.py), the reference episodes
they make (scenarios.py, phrasings.py), the benchmarks drawn from them (benchmarks.py, tasks/), and playing and
scoring episodes against an endpoint (episode.py, scoring.py, runner.py)."""
