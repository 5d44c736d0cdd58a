"""``python -m lightning train ...`` / ``python -m lightning daemon ...``."""

import sys

from lightning._train import main

sys.exit(main())
