"""`kimi-k2 train --config RECIPE [--set SECTION.KEY=VALUE ...]`: run (or resume) a training recipe.

A run resumes from the newest checkpoint in its out_dir when there is one (on any world size that keeps its global
batch). Under `torchrun` it is data parallel, or FSDP2-sharded with expert parallelism when the recipe's [parallel]
section says so (dp_shard, ep; `kimi-k2 plan --train` sizes a layout).
"""

from __future__ import annotations

import argparse
import json

from kimi_k2.train.recipe import Recipe


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="recipe TOML file")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a recipe value (TOML syntax), e.g. --set train.out_dir='\"runs/x\"'")
    parser.add_argument("--out", help="shorthand for --set train.out_dir=OUT")
    parser.add_argument("--seed", type=int, help="shorthand for --set train.seed=SEED")


def run(args: argparse.Namespace) -> int:
    overrides = list(args.set)
    if args.out:
        overrides.append(f"train.out_dir={json.dumps(args.out)}")
    if args.seed is not None:
        overrides.append(f"train.seed={args.seed}")
    recipe = Recipe.from_toml(args.config, overrides)
    from kimi_k2.train.trainer import train  # after the recipe is validated: a bad recipe fails fast

    summary = train(recipe)
    if summary:  # rank 0 only
        print(json.dumps({k: v for k, v in summary.items() if not isinstance(v, list)}))
    return 0
