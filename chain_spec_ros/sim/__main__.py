"""`python -m chain_spec_ros.sim` runs `chain-spec-sim`."""
import sys

from .cli import main

sys.exit(main())
