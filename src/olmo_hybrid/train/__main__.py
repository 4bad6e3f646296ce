"""``python -m olmo_hybrid.train ...`` is ``olmo-hybrid train ...``."""

import sys

from olmo_hybrid.cli.train import main

sys.exit(main(sys.argv[1:]))
