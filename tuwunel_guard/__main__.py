"""Allow ``python -m tuwunel_guard``."""

from tuwunel_guard.cli import main

raise SystemExit(main())
