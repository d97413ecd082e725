"""``python -m samkit.experiments.correlate``: the same as ``samkit correlate``."""

from samkit.experiments.correlate.cli import main

raise SystemExit(main())
