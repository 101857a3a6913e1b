"""``python -m specprof`` runs the command line."""

from specprof.engine.cli import main

main()
