"""``python scripts/reproduce_table1.py`` from a checkout; installed, the same command is ``refuel-reproduce-table1``.

Its flags and documentation: ``refuel_agents/commands/reproduce_table1.py`` (or ``--help``).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from refuel_agents.commands.reproduce_table1 import *  # noqa: E402,F403
from refuel_agents.commands.reproduce_table1 import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
