"""``python scripts/train_agent.py`` from a checkout; installed, the same command is ``refuel-train``.

Its flags and documentation: ``refuel_agents/commands/train.py`` (or ``--help``).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from refuel_agents.commands.train import *  # noqa: E402,F403
from refuel_agents.commands.train import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
