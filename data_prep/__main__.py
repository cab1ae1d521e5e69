"""`python -m data_prep ...` is the same as `bert-prep ...`."""

import sys

from data_prep.cli import main

if __name__ == "__main__":
    sys.exit(main())
