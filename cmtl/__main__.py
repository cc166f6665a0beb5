import sys

from cmtl.cli import main

sys.exit(main())
