"""Train-data generators written to study the nano model (their mix: experiments/k2_nano/synth.py)."""
