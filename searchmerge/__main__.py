"""``python -m searchmerge``: the CLI (how a Ray job's entrypoint runs it from the uploaded working dir)."""

from searchmerge.cli import main

raise SystemExit(main())
