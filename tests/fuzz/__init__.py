"""Hostile-input fuzzing: strategies, a seeded run in the default suite, and ``make fuzz``."""
