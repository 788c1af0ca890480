import sys

from stream_learner.cli.main import main

sys.exit(main())
