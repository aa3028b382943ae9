"""Training data: a pretraining corpus from text on the machine (corpus.py) and synthetic chat / tool-use
conversations (synth.py: reference episodes of kimi_k2.eval's train tools plus invented.py's invented tools), kept
apart from the benchmarks' held-out split (heldout.py)."""
