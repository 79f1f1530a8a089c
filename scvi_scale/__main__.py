"""``python -m scvi_scale`` runs the CLI (also what ``torchrun -m scvi_scale`` starts)."""

from scvi_scale.cli import main

raise SystemExit(main())
