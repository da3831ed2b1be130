import sys

from budgeter.cli import main

sys.exit(main())
