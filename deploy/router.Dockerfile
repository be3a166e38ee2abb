# production-stack's published router image with vllm_router_svcdisc installed; the entry
# point runs the image's unmodified router (vllm_router.app.main) on the library.
#   docker build -f deploy/router.Dockerfile -t <registry>/lmstack-router-svcdisc:<tag> .
ARG ROUTER_IMAGE=lmcache/lmstack-router:latest
FROM ${ROUTER_IMAGE}
COPY . /tmp/vllm-router-svcdisc
RUN /opt/venv/bin/pip install --no-cache-dir /tmp/vllm-router-svcdisc \
    && rm -rf /tmp/vllm-router-svcdisc
ENV PATH=/opt/venv/bin:${PATH}
ENTRYPOINT ["vllm-svcdisc-router"]
CMD []
