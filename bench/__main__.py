"""``python -m bench``: the side-by-side benchmark (see :mod:`bench.compare`)."""

from bench.compare import main

main()
