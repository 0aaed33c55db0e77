import sys

from pipetwin.cli import main

if __name__ == "__main__":
    sys.exit(main())
