import sys

from soda.train.cli import main

sys.exit(main())
