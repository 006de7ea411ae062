import sys

from livegift.cli import main

sys.exit(main())
