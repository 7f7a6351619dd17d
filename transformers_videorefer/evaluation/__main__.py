"""`python -m transformers_videorefer.evaluation eval ...`, also under `accelerate launch -m` and `torchrun -m`."""

import sys

from .cli import main


sys.exit(main())
