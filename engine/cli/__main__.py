"""`python -m engine.cli` is `baton`."""
import sys

from engine.cli.baton import main

sys.exit(main())
