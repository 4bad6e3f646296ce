import sys

from olmo_hybrid.cli import main

sys.exit(main())
