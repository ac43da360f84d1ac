import sys

from service.entrypoints.cli import main

sys.exit(main())
