import sys

from soda.generate.cli import main

sys.exit(main())
