"""``python -m olmo_hybrid.train ...`` is ``olmo-hybrid train ...``."""

import sys

from olmo_hybrid.cli import main

sys.exit(main(["train", *sys.argv[1:]]))
