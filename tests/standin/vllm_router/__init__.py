"""A stand-in for production-stack's router package (``src/vllm_router``, commit a6c01db).

Written for this project's tests, not copied: it mirrors only the module paths, names and
import style that ``vllm_router_svcdisc.prodstack`` relies on — ``app.py`` importing the
initialisers by name, routers importing the getters by name, ``_create_service_discovery``
looked up at call time, ``reconfigure_service_discovery``, ``log.init_logger`` with
``propagate = False``, ``/metrics`` as ``generate_latest()`` of the default registry, and
``main()`` parsing the router's command line before serving.
"""
