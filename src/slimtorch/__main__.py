import sys

from slimtorch.cli.main import main

sys.exit(main())
