"""``python -m kfac_cuda.demo``: see :mod:`kfac_cuda.demo.cli`."""
from .cli import main

raise SystemExit(main())
