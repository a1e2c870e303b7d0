"""The installed commands (``[project.scripts]`` in pyproject.toml), each a ``main(argv)``.

    refuel-train             refuel_agents.commands.train             (scripts/train_agent.py)
    refuel-evaluate          refuel_agents.commands.evaluate          (scripts/evaluate.py)
    refuel-reproduce-table1  refuel_agents.commands.reproduce_table1  (scripts/reproduce_table1.py)

The files in scripts/ run the same ``main`` from a checkout.
"""
