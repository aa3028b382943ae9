"""`python -m kimi_k2.cli COMMAND ...` (as torchrun -m needs): the same entry point as `kimi-k2`."""

import sys

from kimi_k2.cli import main

sys.exit(main())
