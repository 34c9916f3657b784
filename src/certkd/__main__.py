"""``python -m certkd`` (also what ``torchrun -m certkd`` runs)."""
from certkd.cli import main

main()
