"""Training data: a pretraining corpus from text on the machine, and synthetic chat / tool-use conversations."""
