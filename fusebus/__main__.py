"""``python -m fusebus``: the same as the ``fusebus`` command."""

from fusebus.cli import main

raise SystemExit(main())
