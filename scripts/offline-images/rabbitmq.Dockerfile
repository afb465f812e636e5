# A stand-in for the official rabbitmq:4-management image, from Debian trixie's rabbitmq-server
# (4.0.5), for machines that reach Debian's packages but no image registry. It does what
# docker-compose.yml relies on: RABBITMQ_DEFAULT_USER/PASS create the account (guest is not
# created then), the management UI on 15672, streams, logs on stdout, and
# `rabbitmq-diagnostics -q ping` as the healthcheck.
ARG BASE
FROM ${BASE}
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends rabbitmq-server \
    && rm -rf /var/lib/apt/lists/* /var/lib/rabbitmq/mnesia /var/log/rabbitmq/*
COPY rabbitmq-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
# The official image's defaults: logs to stdout, data under /var/lib/rabbitmq (the volume).
ENV RABBITMQ_LOGS=- RABBITMQ_DATA_DIR=/var/lib/rabbitmq
EXPOSE 4369 5552 5672 15672 25672
ENTRYPOINT ["docker-entrypoint.sh"]
CMD ["rabbitmq-server"]
