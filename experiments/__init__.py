"""Studies of the K2 recipe at small scale; each folder has its code, outputs and (opt-in) tests."""
