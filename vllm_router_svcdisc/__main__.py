"""``python -m vllm_router_svcdisc`` is the ``vllm-svcdisc`` command."""

import sys

from .cli import main

sys.exit(main())
