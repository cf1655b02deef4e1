"""`python -m policygrad ...` is the `policygrad` command: what torchrun starts on every rank
(`torchrun --nproc-per-node N -m policygrad train ...`)."""
import sys

from .cli import main

sys.exit(main())
