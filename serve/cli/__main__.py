"""`python -m agentloop.serve.cli`: the `agentloop` command."""

import sys

from agentloop.serve.cli.main import main

sys.exit(main())
