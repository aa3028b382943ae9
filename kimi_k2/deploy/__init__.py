"""Deployment: how many accelerators a model needs and how to lay it out (`plan`), serving a checkpoint larger than RAM
with its routed experts memory-mapped (`offload`), and the serving engine with its experts split over torchrun ranks
(`serve_ep`, on top of `kimi_k2.parallel`)."""

from kimi_k2.deploy.plan import GPUS, Layout, Plan, component_bytes, make_plan, smallest_unit

__all__ = ["GPUS", "Layout", "Plan", "component_bytes", "make_plan", "smallest_unit"]
