import sys

from captum_clsemb.cli.main import main

sys.exit(main())
