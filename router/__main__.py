"""``python -m router CONFIG_JSON``: how ``workerpool up`` starts its router process.

Operators use ``workerpool router``; this entry exists so the supervisor can start the
router by fresh exec with a validated config and nothing inherited but the environment.
"""

from __future__ import annotations

import json
import logging
import sys

from router.router import Router
from workerpool.config import RouterConfig


def main(argv: list[str]) -> int:
    if len(argv) not in (1, 2):
        sys.stderr.write("usage: python -m router '<RouterConfig JSON>' ['<service defaults JSON>']\n")
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s router %(levelname)s %(message)s")
    config = RouterConfig.model_validate_json(argv[0])
    defaults = json.loads(argv[1]) if len(argv) > 1 else {}
    router = Router(config, defaults)
    router.install_signal_handlers()
    router.run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
