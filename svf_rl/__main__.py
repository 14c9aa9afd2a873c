import sys

from svf_rl.cli import main

sys.exit(main())
