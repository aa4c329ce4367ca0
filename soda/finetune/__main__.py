import sys

from soda.finetune.cli import main

sys.exit(main())
