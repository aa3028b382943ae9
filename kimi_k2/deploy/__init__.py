"""Deployment arithmetic for K2-family models across many accelerators (no model is built)."""

from kimi_k2.deploy.plan import GPUS, Layout, Plan, component_bytes, make_plan, smallest_unit

__all__ = ["GPUS", "Layout", "Plan", "component_bytes", "make_plan", "smallest_unit"]
