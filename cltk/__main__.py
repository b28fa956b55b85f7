import sys

from cltk.cli import main

sys.exit(main())
