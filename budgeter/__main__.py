import sys

from budgeter.cli.commands import main

sys.exit(main())
