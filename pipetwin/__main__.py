import sys

from pipetwin.cli import main

sys.exit(main())
