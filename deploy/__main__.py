"""`python -m deploy`: the deploy CLI."""

from deploy.cli import main

raise SystemExit(main())
