import sys

from corral.cli import entry

sys.exit(entry())
