import sys

from supervisor.cli import entry

sys.exit(entry())
