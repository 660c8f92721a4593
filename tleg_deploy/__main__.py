"""``python -m tleg_deploy`` runs the command line."""

from tleg_deploy.cli import main

main()
