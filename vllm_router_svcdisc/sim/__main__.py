"""``python -m vllm_router_svcdisc.sim`` runs the demo (same as ``vllm-svcdisc demo``)."""

import sys

from ..cli import main

sys.exit(main(["demo", *sys.argv[1:]]))
