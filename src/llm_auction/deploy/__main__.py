"""`python -m llm_auction.deploy [OVERLAY ...]`: validate overlays offline (what `make deploy` runs first)."""

import sys

from llm_auction.deploy.validate import main

sys.exit(main())
