"""``python -m emocast_core <command> ...`` (the commands: `emocast_core.cli`)."""
import sys

from .cli import main

sys.exit(main())
