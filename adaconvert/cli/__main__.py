"""``python -m adaconvert.cli`` (the form torchrun and accelerate launch take)."""

import sys

from adaconvert.cli.main import main

sys.exit(main())
