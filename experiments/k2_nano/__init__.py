"""The K2-Nano study: the generators and mixes of its training data, and probes of the shipped model."""
