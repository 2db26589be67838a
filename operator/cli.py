"""`kubellm operator`: run the LLMDeployment operator (kopf) against the cluster of $KUBECONFIG or in-cluster.

Settings come from KUBELLM_* variables (see settings.py); the flags below override the commonest ones.
kopf, the kubernetes client and the handlers are imported inside `run`, so `kubellm --help` stays quick.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--namespace",
        "-n",
        action="append",
        default=None,
        help="watch this namespace (repeatable); default: $KUBELLM_NAMESPACES, else the whole cluster",
    )
    parser.add_argument("--peering", default=None, help="kopf peering name (default: $KUBELLM_PEERING; none)")
    parser.add_argument("--liveness", default=None, help="liveness endpoint, e.g. http://0.0.0.0:8080/healthz")
    parser.add_argument("--verbose", action="store_true", help="debug logging")
    parser.add_argument(
        "--print-crd", action="store_true", help="print the LLMDeployment CRD (YAML) and exit, running nothing"
    )


class _QuietSuccesses(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno <= logging.INFO and str(record.msg).endswith(" succeeded."))


def run(args: argparse.Namespace) -> int:
    if args.print_crd:
        from kubellm.operator.crd import render_crd

        sys.stdout.write(render_crd())
        return 0

    import asyncio
    import getpass
    import os
    import random
    import socket
    import time
    import uuid

    import kopf

    from kubellm.operator import handlers
    from kubellm.operator.settings import Settings, SettingsError, parse_namespaces

    try:
        settings = Settings.from_env()
        overrides: dict[str, object] = {}
        if args.namespace:
            overrides["namespaces"] = parse_namespaces("--namespace", ",".join(args.namespace))
        if args.peering is not None:
            overrides["peering"] = args.peering
        if args.liveness is not None:
            overrides["liveness_endpoint"] = args.liveness
        if args.verbose:
            overrides["log_level"] = "DEBUG"
        settings = dataclasses.replace(settings, **overrides)
        settings.check()
    except SettingsError as exc:
        print(f"kubellm operator: {exc}", file=sys.stderr)
        return 2

    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s [%(funcName)s] %(message)s"
    )

    # kopf logs every successful handler run at INFO (a timer: every few seconds per object); keep the rest.
    logging.getLogger("kopf.objects").addFilter(_QuietSuccesses())
    registry = kopf.OperatorRegistry()
    handlers.register(registry, settings)
    priority = settings.peering_priority or random.randint(1, 2**31 - 1)
    # Our peering identity, as kopf would make it (the pod's name, else user@host/start/random): the fleet loop
    # compares it with the peering object's entries to know whether this replica leads.
    stamp = f"{time.strftime('%Y%m%d%H%M%S', time.gmtime())}/{uuid.uuid4().hex[:4]}"
    identity = os.environ.get("POD_ID") or f"{getpass.getuser()}@{socket.gethostname()}/{stamp}"
    asyncio.run(
        kopf.operator(
            registry=registry,
            clusterwide=not settings.namespaces,
            namespaces=settings.namespaces,
            standalone=not settings.peering,
            peering_name=settings.peering or None,
            priority=priority,
            identity=identity,  # type: ignore[arg-type]  # kopf's Identity is a NewType of str
            liveness_endpoint=settings.liveness_endpoint or None,
            memo=kopf.Memo(identity=identity, priority=priority),
        )
    )
    return 0
