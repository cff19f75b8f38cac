import sys

from dpkit.cli.main import main

sys.exit(main())
