import sys

from pfrest.cli import main

sys.exit(main())
