"""``python -m mogu.cli ...`` (and ``accelerate launch -m mogu.cli ...``): the ``mogu`` command."""
import sys

from . import main

sys.exit(main())
