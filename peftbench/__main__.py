import sys

from peftbench.cli import main

sys.exit(main())
