"""`python -m bench [--quick | --long] [--cases ...] [--impls ...] [--baseline ...] [--out DIR]`."""

import sys

from bench.runner import main

sys.exit(main())
