"""``python -m router CONFIG_JSON``: how ``workerpool up`` starts its router process.

Operators use ``workerpool router``; this entry exists so the supervisor can start the
router by fresh exec with a validated config and nothing inherited but the environment.
"""

from __future__ import annotations

import json
import os
import sys

from router.metrics import ListenerError
from router.router import Router
from workerpool._proc import die_with_parent
from workerpool.config import RouterConfig, SecurityConfig
from workerpool.logs import setup_logging


def main(argv: list[str]) -> int:
    if len(argv) not in (1, 2, 3):
        sys.stderr.write("usage: python -m router '<RouterConfig JSON>' "
                         "['<service defaults JSON>' ['<SecurityConfig JSON>']]\n")
        return 2
    parent = os.environ.get("WORKERPOOL_PARENT_PID")
    die_with_parent(int(parent) if parent else None)  # `up` killed with -9: no orphan router
    setup_logging(role="router")
    config = RouterConfig.model_validate_json(argv[0])
    defaults = json.loads(argv[1]) if len(argv) > 1 else {}
    security = SecurityConfig.model_validate_json(argv[2]) if len(argv) > 2 else None
    try:
        router = Router(config, defaults, security)
    except ListenerError as exc:  # said in one line: `up` stops the pool and exits 1
        sys.stderr.write(f"router: {exc}\n")
        return 1
    router.install_signal_handlers()
    router.run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
